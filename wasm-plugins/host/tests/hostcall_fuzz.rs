#![allow(clippy::unwrap_used)]
//! Random programs of hostcalls, with random and hostile pointers and
//! lengths, run by a guest whose allocator the program can turn hostile
//! (see `hostcalls_guest`): whatever the guest does, the host must not
//! panic, must keep its accounting, and must keep serving.
//!
//! The same guest drives the fuzz target `fuzz/fuzz_targets/wasm_hostcalls.rs`
//! (at the repository's root; docs/fuzzing.md).

mod hostcalls_guest;

use std::sync::OnceLock;

use bytes::BytesMut;
use hostcalls_guest::{DATA, NUM_OPS, OP_ALLOC_MODE, Op, headers, run_request};
use meridian_wasm_host::{Action, HeaderList, Plugin, PluginHost};
use proptest::prelude::*;

fn plugin() -> &'static (PluginHost, Plugin) {
    static P: OnceLock<(PluginHost, Plugin)> = OnceLock::new();
    P.get_or_init(|| hostcalls_guest::load().unwrap())
}

fn arg() -> impl Strategy<Value = i32> {
    prop_oneof![
        4 => 0i32..70_000,
        3 => 0i32..8,
        2 => 0i32..64,
        2 => any::<i32>(),
        1 => prop::sample::select(vec![-1, i32::MIN, i32::MAX, 65_532, 65_535, 65_536, 131_072]),
        3 => prop::sample::select(DATA.iter().flat_map(|&(p, l)| [p, l]).collect::<Vec<_>>()),
    ]
}

/// The hostcalls that return data through the guest's allocator, where a
/// hostile allocator can do the most harm.
fn returning_op() -> impl Strategy<Value = u32> {
    let codes: Vec<u32> = [
        "proxy_get_header_map_pairs",
        "proxy_get_header_map_value",
        "proxy_get_buffer_bytes",
        "proxy_get_property",
        "proxy_get_shared_data",
    ]
    .iter()
    .filter_map(|n| hostcalls_guest::IMPORTS.iter().position(|i| i.name == *n))
    .map(|i| i as u32)
    .collect();
    prop::sample::select(codes)
}

fn op() -> impl Strategy<Value = Op> {
    // The first argument is mostly a map or buffer type.
    let first = prop_oneof![3 => 0i32..8, 1 => arg()];
    let code = prop_oneof![2 => returning_op(), 3 => 0..NUM_OPS];
    let any_op = (code, first, prop::array::uniform9(arg())).prop_map(|(code, a0, rest)| {
        let mut args = [a0; 10];
        args[1..].copy_from_slice(&rest);
        Op { code, args }
    });
    // Make the allocator hostile often.
    let alloc = (
        0..hostcalls_guest::ALLOC_MODES,
        prop_oneof![3 => 0i32..8, 1 => arg()],
    )
        .prop_map(|(mode, a)| {
            let mut args = [0; 10];
            args[0] = mode;
            args[1] = a;
            Op {
                code: OP_ALLOC_MODE,
                args,
            }
        });
    prop_oneof![4 => any_op, 1 => alloc]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_hostcalls_never_panic_the_host(ops in prop::collection::vec(op(), 1..40)) {
        let (_, plugin) = plugin();
        let program = hostcalls_guest::encode(&ops);
        run_request(plugin, &program);
        let _ = plugin.on_tick();
        // Still serving, and nothing leaked: no context outlives its request.
        let stats = plugin.stats();
        prop_assert_eq!(stats.live_contexts, 0, "{:?}", stats);
        prop_assert!(stats.live_instances <= 4, "{:?}", stats);
        let mut ctx = plugin.request_context().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = ctx.on_request_headers(&mut HeaderList::new(), true);
        prop_assert!(matches!(r, Ok(_) | Err(_)));
        drop(ctx);
    }
}

#[test]
fn the_fuzz_guest_runs_a_plain_program() {
    let (_, plugin) = plugin();
    // Add a header from the data area: a well-formed call, status Ok.
    let ops = [Op {
        code: hostcalls_guest::IMPORTS
            .iter()
            .position(|i| i.name == "proxy_add_header_map_value")
            .unwrap() as u32,
        args: [0, 2048, 5, 2304, 5, 0, 0, 0, 0, 0],
    }];
    let mut ctx = plugin.request_context().unwrap();
    let mut req = headers(&[(":path", "/")]);
    assert_eq!(
        ctx.on_request_body(
            &mut BytesMut::from(&hostcalls_guest::encode(&ops)[..]),
            true
        )
        .unwrap(),
        Action::Continue
    );
    // The program is kept: the request-headers callback runs it again.
    assert_eq!(
        ctx.on_request_headers(&mut req, true).unwrap(),
        Action::Continue
    );
    assert!(
        req.iter().any(|(k, v)| k == "x-key" && v == b"value"),
        "{req:?}"
    );
}
