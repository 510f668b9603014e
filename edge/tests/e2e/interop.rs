//! Interop with Debian's curl over TLS: HTTP/1.1 and HTTP/2 by ALPN.

use std::process::Command;

use meridian_e2e::certs::TempDir;
use meridian_e2e::origin::TestOrigin;

use crate::{Edge, Pki, basic_config};

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl").args(args).output().map_err(|e| {
        anyhow::anyhow!("curl is required for the interop tests (apt-get install curl): {e}")
    })?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn curl_http11_and_http2_over_tls() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = TempDir::new("pki")?;
    let pki = Pki::new(dir.path())?;
    let edge = Edge::start(&basic_config(&[origin.url()], &pki.config()))?;
    let port = edge.https().port();
    let resolve = format!("b.test:{port}:127.0.0.1");
    let url = format!("https://b.test:{port}/hello");
    let ca = pki.ca.path.to_str().unwrap_or_default().to_string();
    for (flag, want) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = tokio::task::spawn_blocking({
            let (resolve, url, ca) = (resolve.clone(), url.clone(), ca.clone());
            move || {
                curl(&[
                    "-sS",
                    flag,
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    "-w",
                    "\n%{http_version} %{http_code}",
                    &url,
                ])
            }
        })
        .await??;
        assert_eq!(out, format!("hello\n{want} 200"), "{flag}");
    }
    // A large download through curl over h2, checked by size.
    let out = tokio::task::spawn_blocking(move || {
        let url = format!("https://b.test:{port}/large?mb=64");
        curl(&[
            "-sS",
            "--http2",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &url,
        ])
    })
    .await??;
    assert_eq!(out, (64u64 << 20).to_string());
    Ok(())
}
