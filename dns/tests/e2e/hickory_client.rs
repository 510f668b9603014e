//! Queries through hickory's own async client (UDP), including ECS.

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::support::*;

#[test]
fn hickory_client_queries() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stream = UdpClientStream::builder(s.udp, TokioRuntimeProvider::default())
            .with_timeout(Some(std::time::Duration::from_secs(3)))
            .build();
        let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
        let bg = tokio::spawn(bg);

        let r = client
            .query(
                Name::from_ascii("static.demo.meridian.test.")?,
                DNSClass::IN,
                RecordType::A,
            )
            .await?;
        assert_eq!(addrs(&r), ["192.0.2.100"]);
        assert!(r.metadata.authoritative);

        let r = client
            .query(
                Name::from_ascii("nope.demo.meridian.test.")?,
                DNSClass::IN,
                RecordType::A,
            )
            .await?;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

        // ECS through the client: build the message, send it as a request.
        let m = with_edns(
            query("www.demo.meridian.test.", RecordType::A),
            Some(("203.0.113.0", 24)),
        );
        let mut opts = DnsRequestOptions::default();
        opts.use_edns = true;
        let mut resp = client.send(DnsRequest::new(m, opts));
        use futures_util::StreamExt as _;
        let r = resp
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no response"))??;
        assert_eq!(addrs(&r), ["192.0.2.3"]);
        assert_eq!(ecs_of(&r).map(|e| e.2), Some(24));
        bg.abort();
        Ok::<_, anyhow::Error>(())
    })
}
