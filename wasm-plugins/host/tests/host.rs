#![allow(clippy::unwrap_used)]
//! End-to-end tests of the host with small WAT plugins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use meridian_wasm_host::{
    Action, ErrorKind, FailurePolicy, HeaderEdit, HeaderList, HostConfig, HttpCallResponse, Limits,
    MetricKind, Plugin, PluginError, PluginHost, PropertyResolver,
};

/// Imports, memory, a wrap-around bump allocator at 32 KiB.., the ABI marker
/// and `$check(actual, expected)` which traps on mismatch. Data goes below
/// 16 KiB; return slots live at 16384 (ptr), 16388 (size), 16392 (cas/id).
const PRELUDE: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $rep_hdr (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $rm_hdr (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (func $bump (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65536))
      (then (global.set $heap (i32.const 32768))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func $check (param i32 i32) (if (i32.ne (local.get 0) (local.get 1)) (then unreachable)))
"#;

/// The usual allocator: the bump allocator above.
const ALLOC: &str = r#"
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (call $bump (local.get $n)))
"#;

fn module(body: &str) -> Vec<u8> {
    module_with_alloc(ALLOC, body)
}

/// A module with its own `proxy_on_memory_allocate`.
fn module_with_alloc(alloc: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {PRELUDE} {alloc} {body})")).expect("valid WAT")
}

fn host() -> PluginHost {
    PluginHost::new(HostConfig {
        max_instances: 8,
        max_memory_bytes: 16 << 20,
        epoch_tick: Duration::from_millis(5),
        max_idle_instances_per_plugin: 4,
        ..HostConfig::default()
    })
    .expect("host")
}

fn load(host: &PluginHost, body: &str) -> Plugin {
    host.load(
        "test",
        &module(body),
        b"",
        Limits::default(),
        FailurePolicy::Open,
    )
    .expect("load")
}

fn headers(pairs: &[(&str, &str)]) -> HeaderList {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn get<'a>(h: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

const ADD_HEADER: &str = r#"
  (data (i32.const 0) "x-added")
  (data (i32.const 16) "yes")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $check (call $add_hdr (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)) (i32.const 0))
    (i32.const 0))
"#;

#[test]
fn filter_adds_a_request_header_and_reuses_the_pool() -> anyhow::Result<()> {
    let host = host();
    let plugin = load(&host, ADD_HEADER);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut ctx = plugin.request_context()?;
        ids.push(ctx.id());
        let mut h = headers(&[(":path", "/"), (":method", "GET")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(get(&h, "x-added"), Some(&b"yes"[..]));
        assert_eq!(h.len(), 3);
        ctx.finish()?;
    }
    // One instance, configured once, reused with fresh context ids.
    let stats = plugin.stats();
    assert_eq!(stats.instances_created, 1);
    assert_eq!(stats.idle_instances, 1);
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    Ok(())
}

/// Request headers: add, replace, remove (in mixed case); response headers:
/// replace the whole map, then add.
const EDITS: &str = r#"
  (data (i32.const 0) "X-Added")
  (data (i32.const 16) "yes")
  (data (i32.const 32) "x-a")
  (data (i32.const 48) "new")
  (data (i32.const 64) "X-Gone")
  ;; a serialized map of one pair: "x-only" = "1"
  (data (i32.const 96) "\01\00\00\00\06\00\00\00\01\00\00\00x-only\001\00")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $check (call $add_hdr (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)) (i32.const 0))
    (call $check (call $rep_hdr (i32.const 0) (i32.const 32) (i32.const 3) (i32.const 48) (i32.const 3)) (i32.const 0))
    (call $check (call $rm_hdr (i32.const 0) (i32.const 64) (i32.const 6)) (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $check (call $add_hdr (i32.const 2) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3)) (i32.const 0))
    (call $check (call $set_pairs (i32.const 2) (i32.const 96) (i32.const 23)) (i32.const 0))
    (call $check (call $add_hdr (i32.const 2) (i32.const 32) (i32.const 3) (i32.const 48) (i32.const 3)) (i32.const 0))
    (i32.const 0))
"#;

#[test]
fn header_edits_are_reported_in_order() -> anyhow::Result<()> {
    let host = host();
    let plugin = load(&host, EDITS);
    for _ in 0..2 {
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[(":path", "/"), ("x-a", "1"), ("x-a", "2"), ("x-gone", "z")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(
            ctx.take_request_header_edits(),
            vec![
                HeaderEdit::Add("x-added".into(), b"yes".to_vec()),
                HeaderEdit::Replace("x-a".into(), b"new".to_vec()),
                HeaderEdit::Remove("x-gone".into()),
            ]
        );
        // The list agrees with the edits.
        assert_eq!(
            h,
            headers(&[(":path", "/"), ("x-a", "new"), ("x-added", "yes")])
        );
        assert!(ctx.take_request_header_edits().is_empty(), "taken once");
        let mut r = headers(&[(":status", "200"), ("server", "o")]);
        assert_eq!(ctx.on_response_headers(&mut r, true)?, Action::Continue);
        assert_eq!(
            ctx.take_response_header_edits(),
            vec![HeaderEdit::ReplaceAll],
            "a whole-map replacement supersedes the edits around it"
        );
        assert_eq!(r, headers(&[("x-only", "1"), ("x-a", "new")]));
        // Nothing carries over to the next request on the pooled instance.
        ctx.finish()?;
    }
    Ok(())
}

fn host_of(max_instances: u32) -> PluginHost {
    PluginHost::new(HostConfig {
        max_instances,
        max_memory_bytes: 16 << 20,
        epoch_tick: Duration::from_millis(5),
        max_idle_instances_per_plugin: 4,
        ..HostConfig::default()
    })
    .expect("host")
}

#[test]
fn a_full_host_shares_instances_evicts_idle_ones_and_reports_exhaustion() -> anyhow::Result<()> {
    let host = host_of(2);
    // Each load leaves one idle instance: both slots are taken.
    let a = load(&host, ADD_HEADER);
    let b = load(&host, ADD_HEADER);
    let mut a_ctxs = vec![a.request_context()?];
    // More contexts of `a` find no slot to spare (`b`'s last instance is not
    // evicted for them): they share `a`'s instance, however many.
    for _ in 0..20 {
        a_ctxs.push(a.request_context()?);
    }
    assert_eq!(a.stats().live_instances, 1);
    assert_eq!(a.stats().live_contexts, 21);
    assert_eq!(b.stats().idle_instances, 1);
    for ctx in &mut a_ctxs {
        let mut h = headers(&[(":path", "/")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(get(&h, "x-added"), Some(&b"yes"[..]));
    }
    let mut b1 = b.request_context()?;
    // A third plugin needs its first instance, and every instance hosts
    // requests: none to be had, a distinct overload error.
    let err = host
        .load(
            "c",
            &module(ADD_HEADER),
            b"",
            Limits::default(),
            FailurePolicy::Open,
        )
        .expect_err("no slot left");
    assert_eq!(err.kind(), ErrorKind::Exhausted, "{err}");
    assert!(err.is_overload());
    // `b`'s requests end: its instance goes idle, and is evicted for the
    // first instance of `c`; then `b` gets one back from `a`'s idle one.
    let mut h = headers(&[(":path", "/")]);
    assert_eq!(b1.on_request_headers(&mut h, true)?, Action::Continue);
    drop(b1);
    let c = load(&host, ADD_HEADER);
    assert_eq!(b.stats().live_instances, 0);
    drop(a_ctxs);
    let mut b2 = b.request_context()?;
    assert_eq!(b2.on_request_headers(&mut h, true)?, Action::Continue);
    assert_eq!(a.stats().live_instances, 0, "{:?}", a.stats());
    drop(b2);
    // Dropped plugins give their slots back.
    drop((a, c));
    let _b3 = b.request_context()?;
    let _b4 = b.request_context()?;
    assert_eq!(b.stats().live_instances, 2);
    Ok(())
}

#[test]
fn fresh_instance_per_request() -> anyhow::Result<()> {
    let host = host();
    let limits = Limits {
        fresh_instance_per_request: true,
        ..Limits::default()
    };
    let plugin = host.load(
        "fresh",
        &module(ADD_HEADER),
        b"",
        limits,
        FailurePolicy::Open,
    )?;
    for _ in 0..3 {
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[(":path", "/")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(get(&h, "x-added"), Some(&b"yes"[..]));
    }
    let stats = plugin.stats();
    assert_eq!(stats.instances_created, 4); // load + 3 requests
    assert_eq!(stats.live_instances, 0);
    Ok(())
}

const AUTH: &str = r#"
  (data (i32.const 0) "authorization")
  (data (i32.const 32) "denied")
  (data (i32.const 48) "no entry\n")
  ;; one pair: www-authenticate: Basic
  (data (i32.const 64) "\01\00\00\00\10\00\00\00\05\00\00\00www-authenticate\00Basic\00")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 13) (i32.const 16384) (i32.const 16388)) (i32.const 1))
      (then
        (call $check (call $send (i32.const 401) (i32.const 32) (i32.const 6) (i32.const 48) (i32.const 9)
                                 (i32.const 64) (i32.const 35) (i32.const -1)) (i32.const 0))
        (return (i32.const 1))))
    (i32.const 0))
"#;

#[test]
fn filter_sends_a_local_401() -> anyhow::Result<()> {
    let host = host();
    let plugin = load(&host, AUTH);
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[(":path", "/secret")]);
    match ctx.on_request_headers(&mut h, true)? {
        Action::LocalResponse(r) => {
            assert_eq!(r.status, 401);
            assert_eq!(r.details, "denied");
            assert_eq!(r.body, Bytes::from_static(b"no entry\n"));
            assert_eq!(r.headers, headers(&[("www-authenticate", "Basic")]));
            assert_eq!(r.grpc_status, None);
        }
        other => panic!("expected a local response, got {other:?}"),
    }
    drop(ctx);
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[(":path", "/secret"), ("Authorization", "Basic abc")]);
    assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
    Ok(())
}

const TRAP_ON_HEADER: &str = r#"
  (data (i32.const 0) "x-trap")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then unreachable))
    (i32.const 0))
"#;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

#[test]
fn trap_is_an_error_and_ten_thousand_traps_leave_the_host_healthy() -> anyhow::Result<()> {
    let host = host(); // a pool of only 8 instance slots: a leak would exhaust it
    let plugin = load(&host, TRAP_ON_HEADER);
    let trap = |plugin: &Plugin| {
        let mut ctx = plugin.request_context().expect("context");
        let mut h = headers(&[("x-trap", "1")]);
        let err = ctx.on_request_headers(&mut h, true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Trap, "{err}");
        assert!(
            err.to_string().contains("proxy_on_request_headers"),
            "{err}"
        );
        // The headers come back even when the guest traps.
        assert_eq!(get(&h, "x-trap"), Some(&b"1"[..]));
        // The context is dead; later calls say so instead of running wasm.
        assert_eq!(
            ctx.on_request_headers(&mut h, true).unwrap_err().kind(),
            ErrorKind::Usage
        );
        assert_eq!(FailurePolicy::Open.action_for(&err), Action::Continue);
    };
    for _ in 0..100 {
        trap(&plugin);
    }
    let before = rss_kib();
    for _ in 0..9_900 {
        trap(&plugin);
    }
    let after = rss_kib();
    let stats = plugin.stats();
    assert_eq!(stats.traps, 10_000);
    assert_eq!(stats.failures, 10_000);
    assert_eq!(stats.instances_discarded, 10_000);
    assert!(stats.live_instances <= 1, "{stats:?}");
    eprintln!("rss before {before} KiB, after {after} KiB, stats {stats:?}");
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Still healthy.
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[(":path", "/")]);
    assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
    Ok(())
}

/// With `x-secret`, writes a marker in its first page, and in a page past
/// the part of a freed memory the host zeroes in place (it grows its memory
/// for that), then traps; without, checks that its memory is one page of
/// zeros there (else traps).
const SECRET_THEN_TRAP: &str = r#"
  (data (i32.const 0) "x-secret")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then
        (i32.store (i32.const 20000) (i32.const 0x5ec12e7))
        (drop (memory.grow (i32.const 15)))
        (i32.store (i32.const 900000) (i32.const 0x5ec12e7))
        unreachable))
    (if (i32.ne (memory.size) (i32.const 1)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 20000)) (i32.const 0)) (then unreachable))
    (i32.const 0))
"#;

#[test]
fn a_failed_instances_memory_is_reset_before_the_next_request_sees_it() -> anyhow::Result<()> {
    // The page at 900000 is past MEMORY_KEEP_RESIDENT: both ways of
    // resetting a freed memory (zeroing in place, and madvise) are crossed.
    const { assert!(900_000 > meridian_wasm_host::MEMORY_KEEP_RESIDENT) };
    let host = host();
    let plugin = load(&host, SECRET_THEN_TRAP);
    for round in 0..50 {
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[("x-secret", "1")]);
        let err = ctx.on_request_headers(&mut h, true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Trap, "{err}");
        drop(ctx);
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[(":path", "/")]);
        assert_eq!(
            ctx.on_request_headers(&mut h, true)
                .map_err(|e| anyhow::anyhow!(
                    "round {round}: the next request saw the failed one's memory: {e}"
                ))?,
            Action::Continue
        );
    }
    assert_eq!(plugin.stats().instances_discarded, 50);
    Ok(())
}

/// Held by the tests that burn CPU in loops and measure CPU time, so that
/// they do not take the CPU from each other (the test harness runs tests
/// on parallel threads).
static CPU_HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cpu_heavy() -> std::sync::MutexGuard<'static, ()> {
    CPU_HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The default limits with a callback deadline.
fn deadline_of(deadline: Duration) -> Limits {
    Limits {
        callback_deadline: deadline,
        ..Limits::default()
    }
}

#[test]
fn infinite_loop_hits_the_deadline() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = host();
    // Without the clamp, every loop runs to the configured deadline.
    let limits = Limits {
        deadline_clamp: Duration::ZERO,
        ..deadline_of(Duration::from_millis(50))
    };
    let body = r#"
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (loop $l (br $l))
        (i32.const 0))
    "#;
    let plugin = host.load("spin", &module(body), b"", limits, FailurePolicy::Closed)?;
    for _ in 0..3 {
        let mut ctx = plugin.request_context()?;
        let mut h = HeaderList::new();
        let start = Instant::now();
        let err = ctx.on_request_headers(&mut h, true).unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
        assert!(took >= Duration::from_millis(45), "{took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
        match plugin.policy().action_for(&err) {
            Action::LocalResponse(r) => assert_eq!(r.status, 500),
            other => panic!("{other:?}"),
        }
    }
    let stats = plugin.stats();
    assert_eq!(stats.deadline_exceeded, 3);
    assert_eq!(stats.deadline_clamps, 0);
    Ok(())
}

/// The calling thread's CPU time.
#[allow(unsafe_code)]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(
        u64::try_from(ts.tv_sec).expect("tv_sec"),
        u32::try_from(ts.tv_nsec).expect("tv_nsec"),
    )
}

/// A filter that loops when the request has no headers, and otherwise
/// counts down from `n` (about 6 ms of CPU per 10 million here).
fn loop_or_count(n: u32) -> String {
    format!(
        r#"
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $n i32)
        (if (i32.eqz (local.get 1)) (then (loop $l (br $l))))
        (local.set $n (i32.const {n}))
        (block $done
          (loop $l
            (br_if $done (i32.eqz (local.get $n)))
            (local.set $n (i32.sub (local.get $n) (i32.const 1)))
            (br $l)))
        (i32.const 0))
    "#
    )
}

/// Loads [`loop_or_count`]`(n)`, fail-closed, with a callback deadline.
fn load_loop_or_count(
    host: &PluginHost,
    name: &str,
    n: u32,
    deadline: Duration,
) -> meridian_wasm_host::Result<Plugin> {
    host.load(
        name,
        &module(&loop_or_count(n)),
        b"",
        deadline_of(deadline),
        FailurePolicy::Closed,
    )
}

/// Runs the filter's request headers; `looping` sends no headers (a loop).
/// Returns the outcome and the CPU time the callback used (the context,
/// and the instance it may need, are made before).
fn run_filter(plugin: &Plugin, looping: bool) -> (meridian_wasm_host::Result<Action>, Duration) {
    let mut h = if looping {
        HeaderList::new()
    } else {
        headers(&[("x", "1")])
    };
    let mut ctx = match plugin.request_context() {
        Ok(ctx) => ctx,
        Err(e) => return (Err(e), Duration::ZERO),
    };
    let start = thread_cpu();
    let r = ctx.on_request_headers(&mut h, true);
    (r, thread_cpu().saturating_sub(start))
}

/// After a missed deadline, the plugin's loops are cut at the fuel of its
/// clamp (100,000 units here: its quick callbacks use a few), after well
/// under a millisecond of CPU, not its whole deadline, while its quick
/// callbacks go on succeeding; the error says so. Without the clamp each
/// loop used the whole 50 ms (the plugin chaos scenario: loops at 1% of the
/// requests took all the CPU of the machine).
#[test]
fn a_missed_deadline_clamps_the_plugins_next_loops() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = host();
    let plugin = load_loop_or_count(&host, "clamp", 0, Duration::from_millis(50))?;
    assert!(run_filter(&plugin, false).0.is_ok());
    let (r, cpu) = run_filter(&plugin, true);
    let err = r.expect_err("the loop fails");
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
    assert!(matches!(err, PluginError::DeadlineExceeded { .. }), "{err}");
    assert!(cpu >= Duration::from_millis(45), "{cpu:?}");
    let stats = plugin.stats();
    assert_eq!((stats.deadline_clamps, stats.deadline_clamped), (1, true));
    assert_eq!(stats.clamp_fuel, 100_000);
    for _ in 0..5 {
        let (r, _) = run_filter(&plugin, false);
        assert_eq!(r?, Action::Continue);
        let (r, cpu) = run_filter(&plugin, true);
        let err = r.expect_err("the loop fails");
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
        assert!(
            matches!(err, PluginError::FuelExhausted { fuel: 100_000, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(
                "used all 100000 units of fuel its deadline is clamped to after a missed deadline"
            ),
            "{err}"
        );
        // 100,000 units of a tight loop, and the failure's cost.
        assert!(
            cpu < Duration::from_millis(15),
            "a clamped loop used {cpu:?}"
        );
    }
    let stats = plugin.stats();
    assert_eq!(stats.deadline_exceeded, 6);
    assert_eq!(stats.deadline_clamps, 1, "misses while clamped extend it");
    Ok(())
}

/// Every clamped loop is cut by its fuel, on its own thread, whatever the
/// clock: with the epoch ticks 200 ms apart (no time check can land in a
/// loop this short), none of 1,000 loops, each between quick callbacks,
/// uses more than a few milliseconds of CPU, and each fails with the
/// clamp's fuel. Each loop uses the same fuel, so the same CPU but for the
/// machine's hiccups (on a virtual machine, a thread's CPU clock jumps by
/// the time its virtual CPU was stopped). Before fuel, the clamp was
/// counted in CPU time and needed a per-thread timer to cut a loop; one
/// loop in about 30,000 lost a race with it and ran to the next tick.
#[test]
fn every_clamped_loop_is_cut_by_its_fuel() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = PluginHost::new(HostConfig {
        max_instances: 8,
        max_memory_bytes: 16 << 20,
        epoch_tick: Duration::from_millis(200),
        ..HostConfig::default()
    })?;
    let plugin = load_loop_or_count(&host, "every", 0, Duration::from_millis(50))?;
    assert!(run_filter(&plugin, true).0.is_err());
    assert!(plugin.stats().deadline_clamped);
    let fuel = plugin.stats().clamp_fuel;
    let mut used = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let (r, cpu) = run_filter(&plugin, true);
        assert!(
            matches!(r, Err(PluginError::FuelExhausted { fuel: f, .. }) if f == fuel),
            "{r:?}"
        );
        used.push(cpu);
        for _ in 0..3 {
            assert_eq!(run_filter(&plugin, false).0?, Action::Continue);
        }
    }
    used.sort();
    eprintln!(
        "1,000 clamped loops of {fuel} units of fuel: median {:?}, p99 {:?}, slowest {:?}",
        used[500], used[990], used[999]
    );
    assert!(
        used[999] < Duration::from_millis(10),
        "clamped loops: median {:?}, slowest {:?}",
        used[500],
        &used[990..]
    );
    assert!(
        used[500] < Duration::from_millis(1),
        "median {:?}",
        used[500]
    );
    Ok(())
}

/// A clamp leaves a plugin 4 times the most fuel a successful callback of
/// its used: a heavy callback (4 million rounds, 1.5 to 3 ms of CPU) seen
/// once still succeeds every time while the plugin is clamped, and a loop
/// is cut by its fuel, below the 300 ms deadline. (When the clamp was
/// counted in CPU time, sampled at epoch ticks, a heavy callback seen only
/// once or twice could fail while clamped.)
///
/// Fuel is not time: the loop (`loop (br)`, 1 unit a round) takes about 10
/// times as long per unit as the heavy callback's countdown (5 to 8 units a
/// round, fewer machine instructions than wasm ones), so its 4 times the
/// fuel take about 40 times the heavy callback's CPU: with 16 million
/// rounds (about 7 ms) the loop ran 200 to 290 ms, too close to the
/// deadline to tell the two apart.
#[test]
fn a_clamp_leaves_room_for_what_the_plugin_needed() -> anyhow::Result<()> {
    const ROUNDS: u64 = 4_000_000;
    let _cpu = cpu_heavy();
    let host = host();
    let plugin = load_loop_or_count(&host, "heavy", ROUNDS as u32, Duration::from_millis(300))?;
    let (r, heavy) = run_filter(&plugin, false);
    assert_eq!(r?, Action::Continue);
    let (r, cpu) = run_filter(&plugin, true);
    assert!(
        matches!(r, Err(PluginError::DeadlineExceeded { .. })),
        "{r:?}"
    );
    assert!(cpu >= Duration::from_millis(290), "{cpu:?}");
    // Each round costs 5 to 8 units (wasmtime charges one per instruction,
    // but none for the structure: block, loop, end).
    let fuel = plugin.stats().clamp_fuel;
    assert!(
        (4 * ROUNDS * 5..=4 * (ROUNDS * 8 + 100)).contains(&fuel),
        "clamped to {fuel}"
    );
    for _ in 0..5 {
        let (r, _) = run_filter(&plugin, false);
        assert_eq!(r?, Action::Continue, "a heavy callback fails while clamped");
    }
    let (r, cpu) = run_filter(&plugin, true);
    assert!(
        matches!(r, Err(PluginError::FuelExhausted { fuel: f, .. }) if f == fuel),
        "{r:?}"
    );
    eprintln!("a clamped loop used {cpu:?}; a heavy callback {heavy:?}");
    assert!(
        cpu < Duration::from_millis(200),
        "a clamped loop used {cpu:?}; a heavy callback {heavy:?}"
    );
    Ok(())
}

/// With fuel off (`HostConfig::fuel`), no plugin is clamped: each loop
/// runs its whole deadline, and a quick callback still succeeds.
#[test]
fn without_fuel_no_plugin_is_clamped() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = PluginHost::new(HostConfig {
        max_instances: 8,
        max_memory_bytes: 16 << 20,
        fuel: false,
        ..HostConfig::default()
    })?;
    let plugin = load_loop_or_count(&host, "nofuel", 0, Duration::from_millis(20))?;
    for _ in 0..3 {
        let (r, cpu) = run_filter(&plugin, true);
        assert!(
            matches!(r, Err(PluginError::DeadlineExceeded { .. })),
            "{r:?}"
        );
        assert!(cpu >= Duration::from_millis(18), "{cpu:?}");
        assert_eq!(run_filter(&plugin, false).0?, Action::Continue);
    }
    let stats = plugin.stats();
    assert_eq!((stats.deadline_clamps, stats.deadline_clamped), (0, false));
    assert_eq!(stats.deadline_exceeded, 3);
    Ok(())
}

/// The clamp is per plugin: another plugin of the same host keeps its
/// whole deadline.
#[test]
fn a_clamp_is_the_plugins_own() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = host();
    let load = |name: &str| load_loop_or_count(&host, name, 0, Duration::from_millis(30));
    let (a, b) = (load("a")?, load("b")?);
    assert!(run_filter(&a, true).0.is_err());
    assert!(a.stats().deadline_clamped);
    let (r, cpu) = run_filter(&b, true);
    let err = r.expect_err("loops");
    assert!(matches!(err, PluginError::DeadlineExceeded { .. }), "{err}");
    assert!(cpu >= Duration::from_millis(28), "{cpu:?}");
    Ok(())
}

/// Puts the calling thread in the real-time class (`SCHED_FIFO`, priority
/// 1), so that it preempts every ordinary thread; needs CAP_SYS_NICE.
#[allow(unsafe_code)]
fn real_time() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: a valid sched_param for the calling thread (0).
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins the calling thread to `cpu`.
#[allow(unsafe_code)]
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity get valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The deadline is the callback's CPU time: a callback whose thread is kept
/// off its CPU for three times its deadline still completes. A real-time
/// thread pinned to the same CPU preempts it for 600 ms. With the deadline
/// counted in epoch ticks (wall-clock time) this failed with
/// DeadlineExceeded. Needs CAP_SYS_NICE (root) for SCHED_FIFO, and fails
/// without it.
#[test]
#[allow(unsafe_code)]
fn a_descheduled_callback_does_not_miss_its_deadline() -> anyhow::Result<()> {
    let _cpu = cpu_heavy();
    let host = host();
    let limits = deadline_of(Duration::from_millis(200));
    // About 30 ms of CPU (6 ms per 10 million here): a countdown of 50 million,
    // long enough to be preempted 1 ms in on a much faster machine (or when
    // the hog wakes late on a loaded one), short enough to stay well inside
    // its 200 ms on a much slower one.
    let body = r#"
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $n i32)
        (local.set $n (i32.const 50000000))
        (loop $l
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br_if $l (i32.ne (local.get $n) (i32.const 0))))
        (i32.const 0))
    "#;
    let plugin = host.load("count", &module(body), b"", limits, FailurePolicy::Closed)?;
    let mut ctx = plugin.request_context()?;
    let mut h = HeaderList::new();
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).expect("sched_getcpu");
    let (tx, rx) = std::sync::mpsc::channel();
    let calling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let called = calling.clone();
    let hog = std::thread::spawn(move || {
        pin_to(cpu);
        let set = real_time();
        let ok = set.is_ok();
        tx.send(set).expect("send");
        if ok {
            // Let the callback start (waiting for it here: a fixed sleep
            // raced the test thread, which on a loaded machine could start
            // the call after this thread's spin), then take the CPU from it
            // for 600 ms.
            let t = Instant::now();
            while !called.load(std::sync::atomic::Ordering::Acquire)
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis(1));
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(600) {
                std::hint::spin_loop();
            }
        }
    });
    pin_to(cpu);
    rx.recv()?.map_err(|e| {
        anyhow::anyhow!("SCHED_FIFO needs CAP_SYS_NICE (run the tests as root): {e}")
    })?;
    let start = Instant::now();
    calling.store(true, std::sync::atomic::Ordering::Release);
    let r = ctx.on_request_headers(&mut h, true);
    let took = start.elapsed();
    hog.join().expect("hog");
    assert!(
        took >= Duration::from_millis(450),
        "the callback was not descheduled ({took:?}): the test proves nothing"
    );
    assert_eq!(r?, Action::Continue, "took {took:?}");
    assert_eq!(plugin.stats().deadline_exceeded, 0);
    Ok(())
}

#[test]
fn memory_growth_beyond_the_limit_fails() -> anyhow::Result<()> {
    let host = host();
    let limits = Limits {
        memory_bytes: 1 << 20,
        ..Limits::default()
    }; // 16 pages
    let body = r#"
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; 8 more pages fit under the limit, 100 do not.
        (drop (memory.grow (i32.const 8)))
        (drop (memory.grow (i32.const 100)))
        (i32.const 0))
    "#;
    let plugin = host.load("hog", &module(body), b"", limits, FailurePolicy::Open)?;
    let mut ctx = plugin.request_context()?;
    let err = ctx
        .on_request_headers(&mut HeaderList::new(), true)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MemoryLimit, "{err}");
    assert_eq!(plugin.stats().memory_limit, 1);

    // A module whose initial memory is above the limit does not load.
    let big = wat::parse_str(format!(
        "(module {} (func (export \"proxy_abi_version_0_2_1\")))",
        "(memory (export \"memory\") 32)"
    ))?;
    let err = host
        .load("big", &big, b"", limits, FailurePolicy::Open)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MemoryLimit, "{err}");
    Ok(())
}

#[test]
fn bad_pointers_get_invalid_memory_access() -> anyhow::Result<()> {
    let host = host();
    // Every call below must return 6 (InvalidMemoryAccess), or 21 (WASI FAULT).
    let body = r#"
      (data (i32.const 0) "x-key")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $check (call $log (i32.const 2) (i32.const -16) (i32.const 100)) (i32.const 6))
        (call $check (call $log (i32.const 2) (i32.const 0) (i32.const -1)) (i32.const 6))
        (call $check (call $get_hdr (i32.const 0) (i32.const 65530) (i32.const 10) (i32.const 16384) (i32.const 16388)) (i32.const 6))
        (call $check (call $get_pairs (i32.const 0) (i32.const 65534) (i32.const 16388)) (i32.const 6))
        (call $check (call $get_pairs (i32.const 0) (i32.const 16384) (i32.const -4)) (i32.const 6))
        (call $check (call $add_hdr (i32.const 0) (i32.const 0) (i32.const 5) (i32.const -1) (i32.const 2)) (i32.const 6))
        (call $check (call $get_prop (i32.const 70000) (i32.const 4) (i32.const 16384) (i32.const 16388)) (i32.const 6))
        (call $check (call $set_shared (i32.const 0) (i32.const 5) (i32.const 65535) (i32.const 2) (i32.const 0)) (i32.const 6))
        (call $check (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const -100) (i32.const 200)
                                 (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 6))
        (call $check (call $define_metric (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 65533)) (i32.const 6))
        (call $check (call $now (i32.const 65532)) (i32.const 6))
        (call $check (call $get_buf (i32.const 7) (i32.const 0) (i32.const 10) (i32.const 65535) (i32.const 16388)) (i32.const 0))
        (call $check (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -8) (i32.const 16)) (i32.const 6))
        ;; unknown buffer id
        (call $check (call $set_buf (i32.const 42) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1)) (i32.const 2))
        (call $check (call $http_call (i32.const 0) (i32.const 100000) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                      (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 16384)) (i32.const 6))
        ;; iovec table out of bounds; then an iovec pointing out of bounds
        (call $check (call $fd_write (i32.const 1) (i32.const 65530) (i32.const 2) (i32.const 16384)) (i32.const 21))
        (i32.store (i32.const 100) (i32.const -50))
        (i32.store (i32.const 104) (i32.const 100))
        (call $check (call $fd_write (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 16384)) (i32.const 21))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[("x-key", "v")]);
    assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
    assert_eq!(h, headers(&[("x-key", "v")]));
    assert_eq!(plugin.stats().failures, 0);
    Ok(())
}

#[test]
fn unknown_imports_return_unimplemented() -> anyhow::Result<()> {
    let host = host();
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "proxy_not_in_any_spec" (func $a (param i32) (result i32)))
          (import "other_module" "thing" (func $b (result i64 i32)))
          (import "wasi_snapshot_preview1" "fd_readdir" (func $c (param i32 i32 i32 i64 i32) (result i32)))
          (import "env" "proxy_call_foreign_function" (func $ffi (param i32 i32 i32 i32 i32 i32) (result i32)))
          (import "env" "proxy_register_shared_queue" (func $q (param i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_0"))
          (func $check (param i32 i32) (if (i32.ne (local.get 0) (local.get 1)) (then unreachable)))
          (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (local $r i32)
            (call $check (call $a (i32.const 1)) (i32.const 12))
            (local.set $r (call $b))
            (drop)
            (call $check (local.get $r) (i32.const 12))
            (call $check (call $c (i32.const 3) (i32.const 0) (i32.const 0) (i64.const 0) (i32.const 0)) (i32.const 52))
            (call $check (call $ffi (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)) (i32.const 12))
            (call $check (call $q (i32.const 0) (i32.const 0) (i32.const 0)) (i32.const 12))
            (i32.const 0)))"#,
    )?;
    let plugin = host.load(
        "unknown",
        &wasm,
        b"",
        Limits::default(),
        FailurePolicy::Open,
    )?;
    let mut ctx = plugin.request_context()?;
    assert_eq!(
        ctx.on_request_headers(&mut HeaderList::new(), true)?,
        Action::Continue
    );
    Ok(())
}

#[test]
fn modules_without_the_abi_marker_are_rejected() {
    let host = host();
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let err = host
        .load(
            "nomarker",
            &wasm,
            b"",
            Limits::default(),
            FailurePolicy::Open,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidAbi, "{err}");
    // 0.1.0-style callback signature.
    let wasm = module(
        r#"(func (export "proxy_on_request_headers") (param i32 i32) (result i32) (i32.const 0))"#,
    );
    let err = host
        .load("old", &wasm, b"", Limits::default(), FailurePolicy::Open)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidAbi, "{err}");
    let err = host
        .load(
            "garbage",
            b"\0asm garbage",
            b"",
            Limits::default(),
            FailurePolicy::Open,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Compile, "{err}");
}

#[test]
fn shared_data_cas_through_the_abi() -> anyhow::Result<()> {
    let host = host();
    let body = r#"
      (data (i32.const 0) "k")
      (data (i32.const 16) "from-plugin")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; A stale CAS loses...
        (call $check (call $set_shared (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 11) (i32.const 999999)) (i32.const 8))
        ;; ...an unconditional write wins.
        (call $check (call $set_shared (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 11) (i32.const 0)) (i32.const 0))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    let cas = plugin.shared_data().set("k", b"from-host", 0).unwrap();
    let mut ctx = plugin.request_context()?;
    assert_eq!(
        ctx.on_request_headers(&mut HeaderList::new(), true)?,
        Action::Continue
    );
    let (value, new_cas) = plugin.shared_data().get("k").unwrap();
    assert_eq!(value, Bytes::from_static(b"from-plugin"));
    assert_ne!(new_cas, cas);
    Ok(())
}

#[test]
fn plugin_metrics_are_visible_to_the_embedder() -> anyhow::Result<()> {
    let host = host();
    let body = r#"
      (data (i32.const 0) "requests_total")
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (call $check (call $define_metric (i32.const 0) (i32.const 0) (i32.const 14) (i32.const 16392)) (i32.const 0))
        (i32.const 1))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $check (call $inc_metric (i32.load (i32.const 16392)) (i64.const 1)) (i32.const 0))
        ;; counters cannot go down
        (call $check (call $inc_metric (i32.load (i32.const 16392)) (i64.const -1)) (i32.const 2))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    for _ in 0..3 {
        let mut ctx = plugin.request_context()?;
        ctx.on_request_headers(&mut HeaderList::new(), true)?;
    }
    let m = plugin.metrics();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].name.as_str(), m[0].kind, m[0].value),
        ("requests_total", MetricKind::Counter, 3)
    );
    Ok(())
}

struct Country;
impl PropertyResolver for Country {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        (path == ["meridian", "client", "country"]).then(|| b"NZ".to_vec())
    }
}

#[test]
fn properties_builtin_and_embedder_supplied() -> anyhow::Result<()> {
    let host = host();
    // Copies request.path into x-path and meridian.client.country into x-country.
    let body = r#"
      (data (i32.const 0) "request\00path")
      (data (i32.const 16) "meridian\00client\00country")
      (data (i32.const 48) "x-path")
      (data (i32.const 64) "x-country")
      (data (i32.const 80) "no\00such")
      (func $copy (param $path i32) (param $plen i32) (param $hdr i32) (param $hlen i32)
        (call $check (call $get_prop (local.get $path) (local.get $plen) (i32.const 16384) (i32.const 16388)) (i32.const 0))
        (call $check (call $add_hdr (i32.const 0) (local.get $hdr) (local.get $hlen)
                                    (i32.load (i32.const 16384)) (i32.load (i32.const 16388))) (i32.const 0)))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $copy (i32.const 0) (i32.const 12) (i32.const 48) (i32.const 6))
        (call $copy (i32.const 16) (i32.const 23) (i32.const 64) (i32.const 9))
        (call $check (call $get_prop (i32.const 80) (i32.const 7) (i32.const 16384) (i32.const 16388)) (i32.const 1))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context_with(Arc::new(Country))?;
    let mut h = headers(&[(":path", "/a/b?c")]);
    assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
    assert_eq!(get(&h, "x-path"), Some(&b"/a/b?c"[..]));
    assert_eq!(get(&h, "x-country"), Some(&b"NZ"[..]));
    Ok(())
}

#[test]
fn http_call_pauses_and_resumes() -> anyhow::Result<()> {
    let host = host();
    // Headers: :method GET, :path /check, :authority auth
    let body = r#"
      (data (i32.const 0) "auth-service")
      (data (i32.const 16) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\06\00\00\00\0a\00\00\00\04\00\00\00:method\00GET\00:path\00/check\00:authority\00auth\00")
      (data (i32.const 200) "x-auth")
      (data (i32.const 216) "ok")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $check (call $http_call (i32.const 0) (i32.const 12) (i32.const 16) (i32.const 76)
                                      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                      (i32.const 500) (i32.const 16392)) (i32.const 0))
        (i32.const 1))
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        ;; token 1, one header, 2 body bytes, no trailers
        (call $check (local.get 1) (i32.const 1))
        (call $check (local.get 2) (i32.const 1))
        (call $check (call $get_buf (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 16384) (i32.const 16388)) (i32.const 0))
        (call $check (i32.load (i32.const 16388)) (i32.const 2))
        (call $check (call $add_hdr (i32.const 0) (i32.const 200) (i32.const 6) (i32.const 216) (i32.const 2)) (i32.const 0))
        (call $check (call $continue (i32.const 0)) (i32.const 0)))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[(":path", "/")]);
    assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Pause);
    let calls = ctx.take_http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].upstream, "auth-service");
    assert_eq!(calls[0].timeout, Duration::from_millis(500));
    assert_eq!(get(&calls[0].headers, ":path"), Some(&b"/check"[..]));
    let resp = HttpCallResponse {
        headers: headers(&[(":status", "200")]),
        body: Bytes::from_static(b"ok"),
        trailers: vec![],
    };
    assert_eq!(
        ctx.on_http_call_response(calls[0].token, Some(resp), &mut h)?,
        Action::Continue
    );
    assert_eq!(get(&h, "x-auth"), Some(&b"ok"[..]));
    Ok(())
}

#[test]
fn body_can_be_replaced() -> anyhow::Result<()> {
    let host = host();
    let body = r#"
      (data (i32.const 0) "REDACTED")
      (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
        (call $check (call $set_buf (i32.const 0) (i32.const 0) (local.get 1) (i32.const 0) (i32.const 8)) (i32.const 0))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context()?;
    let mut b = BytesMut::from(&b"secret password"[..]);
    assert_eq!(ctx.on_request_body(&mut b, true)?, Action::Continue);
    assert_eq!(&b[..], b"REDACTED");
    Ok(())
}

#[test]
fn configure_sees_the_plugin_config_and_can_reject_it() -> anyhow::Result<()> {
    let host = host();
    // Accept only a configuration that is exactly "ok".
    let body = r#"
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (if (i32.ne (local.get 1) (i32.const 2)) (then (return (i32.const 0))))
        (call $check (call $get_buf (i32.const 7) (i32.const 0) (i32.const 2) (i32.const 16384) (i32.const 16388)) (i32.const 0))
        (i32.eq (i32.load16_u (i32.load (i32.const 16384))) (i32.const 0x6b6f)))
    "#;
    let wasm = module(body);
    host.load("cfg", &wasm, b"ok", Limits::default(), FailurePolicy::Open)?;
    let err = host
        .load("cfg", &wasm, b"no", Limits::default(), FailurePolicy::Open)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigureRejected);
    let err = host
        .load(
            "cfg",
            &wasm,
            b"nope",
            Limits::default(),
            FailurePolicy::Open,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigureRejected);
    Ok(())
}

/// Per-callback overhead. Run with
/// `cargo test --release -- --ignored --nocapture bench_`.
/// What a clamp in force costs a request that does not loop: the same
/// plugin, clamped and not, in alternating rounds (a loop clamps one, the
/// other has the clamp turned off).
#[test]
#[ignore]
fn bench_a_clamp_in_force() -> anyhow::Result<()> {
    let host = host();
    let clamped = load_loop_or_count(&host, "clamped", 0, Duration::from_millis(5))?;
    let free = host.load(
        "free",
        &module(&loop_or_count(0)),
        b"",
        Limits {
            deadline_clamp: Duration::ZERO,
            ..deadline_of(Duration::from_millis(5))
        },
        FailurePolicy::Closed,
    )?;
    assert!(run_filter(&clamped, true).0.is_err());
    let n = 200_000u32;
    let mut h = headers(&[("x", "1")]);
    let mut per = |plugin: &Plugin| -> anyhow::Result<u128> {
        let start = Instant::now();
        for _ in 0..n {
            let mut ctx = plugin.request_context()?;
            ctx.on_request_headers(&mut h, true)?;
            ctx.finish()?;
        }
        Ok(start.elapsed().as_nanos() / u128::from(n))
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        // The clamp lasts 10 s from the loop: keep it in force.
        assert!(run_filter(&clamped, true).0.is_err());
        with.push(per(&clamped)?);
        without.push(per(&free)?);
        assert!(clamped.stats().deadline_clamped);
        assert!(!free.stats().deadline_clamped);
    }
    with.sort();
    without.sort();
    println!(
        "pooled request (context create + headers + done + delete): {} ns clamped, {} ns not (medians of 5: {with:?} / {without:?})",
        with[2], without[2]
    );
    Ok(())
}

#[test]
#[ignore]
fn bench_on_request_headers() -> anyhow::Result<()> {
    let host = host();
    let plugin = load(&host, ADD_HEADER);
    let n = 200_000;
    let mut h = headers(&[(":path", "/"), (":method", "GET"), ("host", "example.com")]);
    let mut ctx = plugin.request_context()?;
    let start = Instant::now();
    for _ in 0..n {
        ctx.on_request_headers(&mut h, true)?;
        h.truncate(3);
    }
    let per_call = start.elapsed().as_nanos() / n;
    drop(ctx);
    let start = Instant::now();
    for _ in 0..n {
        let mut ctx = plugin.request_context()?;
        ctx.on_request_headers(&mut h, true)?;
        ctx.finish()?;
        h.truncate(3);
    }
    let per_request = start.elapsed().as_nanos() / n;
    let fresh = host.load(
        "fresh",
        &module(ADD_HEADER),
        b"",
        Limits {
            fresh_instance_per_request: true,
            ..Limits::default()
        },
        FailurePolicy::Open,
    )?;
    let m = 20_000;
    let start = Instant::now();
    for _ in 0..m {
        let mut ctx = fresh.request_context()?;
        ctx.on_request_headers(&mut h, true)?;
        ctx.finish()?;
        h.truncate(3);
    }
    let per_fresh = start.elapsed().as_nanos() / m;
    println!("on_request_headers (add one header): {per_call} ns/callback");
    println!("pooled request (context create + headers + done + delete): {per_request} ns/request");
    println!(
        "fresh instance per request (instantiate + configure + headers + done + delete): {per_fresh} ns/request"
    );
    Ok(())
}

/// What counting fuel costs compute: the CPU time of one callback counting
/// down from 50 million (a tight wasm loop, the worst case for fuel: a
/// check per round), median of 7. Build it on a revision without fuel to
/// compare.
#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn bench_a_heavy_callback() -> anyhow::Result<()> {
    let host = host();
    let plugin = load_loop_or_count(&host, "heavy", 50_000_000, Duration::from_secs(5))?;
    let mut cpu = Vec::new();
    for _ in 0..7 {
        let (r, used) = run_filter(&plugin, false);
        assert_eq!(r?, Action::Continue);
        cpu.push(used);
    }
    cpu.sort();
    println!(
        "a countdown from 50 million: {:?} of CPU (median of 7: {cpu:?})",
        cpu[3]
    );
    Ok(())
}

/// What counting fuel costs real compute: a whole pooled request through
/// `jwt-auth` (built by `wasm-plugins/build`) checking a valid HS256 token
/// (SHA-256 in wasm, with the claims' checks). Build it on a revision
/// without fuel to compare.
#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture (needs wasm-plugins/dist)"]
fn bench_jwt_auth_hs256() -> anyhow::Result<()> {
    fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            }
        }
        out
    }
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let wasm = std::fs::read(dist.join("jwt-auth.wasm"))
        .map_err(|e| anyhow::anyhow!("jwt-auth.wasm: {e} (run wasm-plugins/build)"))?;
    let host = PluginHost::new(HostConfig::default())?;
    let secret = "bench-secret";
    let plugin = host.load(
        "jwt-auth",
        &wasm,
        format!(
            r#"{{"alg":"HS256","secret":"{secret}","issuer":"https://issuer.test","audience":"meridian"}}"#
        )
        .as_bytes(),
        Limits::default(),
        FailurePolicy::Closed,
    )?;
    let head = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims =
        b64url(br#"{"iss":"https://issuer.test","aud":"meridian","sub":"bench","exp":4102444800}"#);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, format!("{head}.{claims}").as_bytes());
    let auth = format!("Bearer {head}.{claims}.{}", b64url(sig.as_ref()));
    let req = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "www.example.com"),
        (":path", "/obj"),
        ("authorization", auth.as_str()),
    ];
    let n = 20_000u32;
    let mut per = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..n {
            let mut ctx = plugin.request_context()?;
            let mut h = headers(&req);
            assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
            ctx.finish()?;
        }
        per.push(start.elapsed().as_nanos() / u128::from(n));
    }
    per.sort();
    println!(
        "jwt-auth, a valid HS256 token: {} ns per request (median of 5: {per:?})",
        per[2]
    );
    Ok(())
}

/// What a clamp costs quick callbacks: two threads run requests through a
/// plugin (context, `on_request_headers`, done) back to back for 1 s,
/// unclamped and clamped in turn, three times; requests per second of each
/// pair of threads.
#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn bench_clamped_quick_callbacks_two_threads() -> anyhow::Result<()> {
    let host = host();
    let plugin = load_loop_or_count(&host, "steady", 0, Duration::from_millis(50))?;
    let run = |plugin: &Plugin| -> u64 {
        let phase = Duration::from_secs(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let t0 = Instant::now();
                        let mut n = 0u64;
                        while t0.elapsed() < phase && n < 100_000_000 {
                            let _ = run_filter(plugin, false);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        })
    };
    for round in 0..3 {
        let free = run(&plugin);
        // One loop clamps the plugin for 10 s (the default window).
        assert!(run_filter(&plugin, true).0.is_err());
        assert!(plugin.stats().deadline_clamped);
        let clamped = run(&plugin);
        println!(
            "round {round}: unclamped {free} req/s, clamped {clamped} req/s ({:+.1}%)",
            (clamped as f64 / free.max(1) as f64 - 1.0) * 100.0
        );
        // Let the clamp end before the next unclamped run.
        let until = Instant::now() + Duration::from_secs(12);
        while plugin.stats().deadline_clamped && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Memory per live instance of the real example plugins (built by
/// `wasm-plugins/build`): 200 requests in flight at once, each holding its
/// own instance, RSS before and after.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture (needs wasm-plugins/dist)"]
fn bench_instance_memory() -> anyhow::Result<()> {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let n = 200;
    for (name, cfg) in [
        ("headers", r#"{"response":{"remove":["Server"]}}"#),
        ("jwt-auth", r#"{"alg":"HS256","secret":"s"}"#),
        ("rewrite", r#"{"rules":[{"find":"a","replace":"b"}]}"#),
        ("compat", "x"),
    ] {
        let wasm = std::fs::read(dist.join(format!("{name}.wasm")))
            .map_err(|e| anyhow::anyhow!("{name}.wasm: {e} (run wasm-plugins/build)"))?;
        let host = PluginHost::new(HostConfig {
            max_instances: 512,
            max_idle_instances_per_plugin: 512,
            ..HostConfig::default()
        })?;
        let plugin = host.load(
            name,
            &wasm,
            cfg.as_bytes(),
            Limits::default(),
            FailurePolicy::Open,
        )?;
        let before = rss_kib();
        let mut ctxs = Vec::with_capacity(n);
        for _ in 0..n {
            let mut ctx = plugin.request_context()?;
            let mut h = headers(&[(":path", "/"), (":method", "GET"), (":authority", "x")]);
            ctx.on_request_headers(&mut h, true)?;
            ctxs.push(ctx);
        }
        let after = rss_kib();
        assert_eq!(plugin.stats().live_instances, n as u64);
        println!(
            "{name}: {} bytes of module, {} KiB resident per live instance ({n} instances)",
            wasm.len(),
            after.saturating_sub(before) / n as u64
        );
    }
    Ok(())
}

/// A whole pooled request through each real example plugin (built by
/// `wasm-plugins/build`): context, request headers, response headers, log,
/// done, delete — what the edge does per request.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture (needs wasm-plugins/dist)"]
fn bench_real_plugins() -> anyhow::Result<()> {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let host = PluginHost::new(HostConfig::default())?;
    let req = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "www.example.com"),
        (":path", "/static/app.js?v=3"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
        ("x-forwarded-for", "192.0.2.1"),
    ];
    let resp = [
        (":status", "200"),
        ("content-type", "application/javascript"),
        ("content-length", "1024"),
        ("server", "nginx"),
        ("cache-control", "public, max-age=3600"),
        ("etag", "\"abc\""),
    ];
    let n = 50_000u32;
    for (name, cfg) in [
        (
            "headers",
            r#"{"request":{"add":{"X-From-Edge":"1"}},"response":{"add":{"Strict-Transport-Security":"max-age=63072000"},"remove":["Server"]}}"#,
        ),
        (
            "geo-redirect",
            r#"{"rules":[{"countries":["KP"],"deny":451}],"default":"continue"}"#,
        ),
        ("compat", "x"),
    ] {
        let wasm = std::fs::read(dist.join(format!("{name}.wasm")))
            .map_err(|e| anyhow::anyhow!("{name}.wasm: {e} (run wasm-plugins/build)"))?;
        let plugin = host.load(
            name,
            &wasm,
            cfg.as_bytes(),
            Limits::default(),
            FailurePolicy::Open,
        )?;
        let before = plugin.stats().callbacks;
        let start = Instant::now();
        for _ in 0..n {
            let mut ctx = plugin.request_context()?;
            let mut h = headers(&req);
            ctx.on_request_headers(&mut h, true)?;
            ctx.keep_request_headers(h);
            let mut r = headers(&resp);
            ctx.on_response_headers(&mut r, false)?;
            ctx.on_log(&mut Vec::new(), &mut r)?;
            ctx.finish()?;
        }
        let per = start.elapsed().as_nanos() / u128::from(n);
        let calls = (plugin.stats().callbacks - before) / u64::from(n);
        println!(
            "{name}: {per} ns per request ({calls} callbacks, {} ns each)",
            per / u128::from(calls.max(1))
        );
    }
    Ok(())
}

#[test]
fn api_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<PluginHost>();
    send_sync::<Plugin>();
    send::<meridian_wasm_host::RequestContext>();
}

#[test]
fn on_log_reads_both_header_maps() -> anyhow::Result<()> {
    let host = host();
    // on_log copies response header "x-cache" into request header "x-logged".
    let body = r#"
      (data (i32.const 0) "x-cache")
      (data (i32.const 16) "x-logged")
      (func (export "proxy_on_log") (param i32)
        (call $check (call $get_hdr (i32.const 2) (i32.const 0) (i32.const 7) (i32.const 16384) (i32.const 16388)) (i32.const 0))
        (call $check (call $add_hdr (i32.const 0) (i32.const 16) (i32.const 8)
                                    (i32.load (i32.const 16384)) (i32.load (i32.const 16388))) (i32.const 0)))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context()?;
    let mut req = headers(&[(":path", "/")]);
    let mut resp = headers(&[(":status", "200"), ("x-cache", "HIT")]);
    assert!(ctx.on_done()?);
    ctx.on_log(&mut req, &mut resp)?;
    ctx.finish()?;
    assert_eq!(get(&req, "x-logged"), Some(&b"HIT"[..]));
    Ok(())
}

#[test]
fn stalled_requests_hold_no_instance_between_callbacks() -> anyhow::Result<()> {
    let host = host_of(4);
    let plugin = load(&host, AUTH);
    // Fifty requests with credentials pass and then stall (their contexts stay
    // open, as for clients that read nothing): they share the instances.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[(":path", "/big"), ("authorization", "Bearer x")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        stalled.push(ctx);
    }
    let stats = plugin.stats();
    assert!(stats.live_instances <= 4, "{stats:?}");
    assert_eq!(stats.live_contexts, 50);
    // A request without credentials still meets the plugin.
    let mut ctx = plugin.request_context()?;
    let mut h = headers(&[(":path", "/big")]);
    match ctx.on_request_headers(&mut h, true)? {
        Action::LocalResponse(r) => assert_eq!(r.status, 401),
        other => panic!("the plugin was skipped: {other:?}"),
    }
    drop(ctx);
    // The stalled ones carry on, and end.
    for mut ctx in stalled {
        ctx.on_log(&mut Vec::new(), &mut headers(&[(":status", "200")]))?;
        ctx.finish()?;
    }
    let stats = plugin.stats();
    assert_eq!(stats.live_contexts, 0);
    assert_eq!(stats.idle_instances as u64, stats.live_instances);
    assert_eq!(stats.overloads, 0);
    Ok(())
}

#[test]
fn a_trap_discards_the_shared_instance_and_its_other_contexts_fail_by_policy() -> anyhow::Result<()>
{
    let host = host_of(1); // one slot: every context shares one instance
    let plugin = host.load(
        "trap",
        &module(TRAP_ON_HEADER),
        b"",
        Limits::default(),
        FailurePolicy::Closed,
    )?;
    let mut a = plugin.request_context()?;
    let mut b = plugin.request_context()?;
    assert_eq!(plugin.stats().live_instances, 1);
    let mut h = headers(&[(":path", "/")]);
    assert_eq!(b.on_request_headers(&mut h, true)?, Action::Continue);
    let err = a
        .on_request_headers(&mut headers(&[("x-trap", "1")]), true)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Trap, "{err}");
    // `b` lived in the discarded instance: its next callback fails cleanly,
    // and its policy decides.
    let lost = b
        .on_response_headers(&mut headers(&[(":status", "200")]), true)
        .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::InstanceLost, "{lost}");
    assert!(!lost.is_overload());
    match FailurePolicy::Closed.action_for(&lost) {
        Action::LocalResponse(r) => assert_eq!(r.status, 500),
        other => panic!("{other:?}"),
    }
    assert_eq!(FailurePolicy::Open.action_for(&lost), Action::Continue);
    assert_eq!(
        b.on_log(&mut Vec::new(), &mut Vec::new())
            .unwrap_err()
            .kind(),
        ErrorKind::Usage
    );
    drop((a, b));
    let stats = plugin.stats();
    assert_eq!(
        (stats.traps, stats.instances_discarded, stats.lost_contexts),
        (1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.live_contexts, 0);
    // New requests get a new instance.
    let mut c = plugin.request_context()?;
    assert_eq!(c.on_request_headers(&mut h, true)?, Action::Continue);
    assert_eq!(plugin.stats().live_instances, 1);
    Ok(())
}

/// Spins for 300 ms (by the host's clock) when the request has `x-spin`.
const SPIN: &str = r#"
  (data (i32.const 0) "x-spin")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $t0 i64)
    (if (i32.ne (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then (return (i32.const 0))))
    (call $check (call $now (i32.const 16400)) (i32.const 0))
    (local.set $t0 (i64.load (i32.const 16400)))
    (loop $spin
      (call $check (call $now (i32.const 16400)) (i32.const 0))
      (br_if $spin (i64.lt_u (i64.sub (i64.load (i32.const 16400)) (local.get $t0)) (i64.const 300000000))))
    (i32.const 0))
"#;

#[test]
fn a_callback_that_cannot_lock_its_instance_is_overload_not_a_failure() -> anyhow::Result<()> {
    let host = PluginHost::new(HostConfig {
        max_instances: 1,
        lock_wait: Duration::from_millis(20),
        ..HostConfig::default()
    })?;
    let limits = Limits {
        callback_deadline: Duration::from_secs(2),
        ..Limits::default()
    };
    let plugin = host.load("spin", &module(SPIN), b"", limits, FailurePolicy::Open)?;
    let mut a = plugin.request_context()?;
    let mut b = plugin.request_context()?;
    let spinner = std::thread::spawn(move || {
        let r = a.on_request_headers(&mut headers(&[("x-spin", "1")]), true);
        (a, r.map_err(|e| e.to_string()))
    });
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let err = b
        .on_request_headers(&mut headers(&[(":path", "/")]), true)
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(20));
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.is_overload());
    // Overload is 503 whatever the policy: an open policy must not skip.
    for policy in [FailurePolicy::Open, FailurePolicy::Closed] {
        match policy.action_for(&err) {
            Action::LocalResponse(r) => assert_eq!(r.status, 503),
            other => panic!("{policy:?}: {other:?}"),
        }
    }
    let (a, r) = spinner.join().expect("spinner");
    assert_eq!(r, Ok(Action::Continue));
    // Nothing was lost: `b` goes on once the instance is free.
    assert_eq!(
        b.on_request_headers(&mut headers(&[(":path", "/")]), true)?,
        Action::Continue
    );
    drop((a, b));
    let stats = plugin.stats();
    assert_eq!((stats.overloads, stats.failures), (1, 0), "{stats:?}");
    Ok(())
}

/// An allocator that, while `$evil` is set, first does what `$evil` says:
/// 1 adds a request header, 2 removes `x-a`, 3 rewrites the request body
/// (its status goes to 16400), 4 returns a pointer far outside memory.
const EVIL_ALLOC: &str = r#"
  (global $evil (mut i32) (i32.const 0))
  (data (i32.const 1000) "x-evil")
  (data (i32.const 1016) "1")
  (data (i32.const 1032) "x-a")
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (if (i32.eq (global.get $evil) (i32.const 1))
      (then (drop (call $add_hdr (i32.const 0) (i32.const 1000) (i32.const 6) (i32.const 1016) (i32.const 1)))))
    (if (i32.eq (global.get $evil) (i32.const 2))
      (then (drop (call $rm_hdr (i32.const 0) (i32.const 1032) (i32.const 3)))))
    (if (i32.eq (global.get $evil) (i32.const 3))
      (then (i32.store (i32.const 16400)
              (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 6)))))
    (if (i32.eq (global.get $evil) (i32.const 4))
      (then (return (i32.const 0x7fff0000))))
    (call $bump (local.get $n)))
"#;

/// Request headers: `:path` `/pairs` gets the map with the allocator in mode
/// 1, `/value` gets the last header's value in mode 2, `/far` the map in
/// mode 4. Request body: read in mode 3; the guest checks it got the body
/// as it was (`hello`) and that the allocator's rewrite found no body.
const EVIL: &str = r#"
  (data (i32.const 0) ":path")
  (data (i32.const 16) "/pairs")
  (data (i32.const 32) "/value")
  (data (i32.const 48) "/far")
  (func $path_is (param $p i32) (param $len i32) (result i32)
    (call $check (call $get_hdr (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 16384) (i32.const 16388)) (i32.const 0))
    (if (i32.ne (i32.load (i32.const 16388)) (local.get $len)) (then (return (i32.const 0))))
    (i32.eq (i32.load (i32.load (i32.const 16384))) (i32.load (local.get $p))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (call $path_is (i32.const 16) (i32.const 6)) (then
      (global.set $evil (i32.const 1))
      (drop (call $get_pairs (i32.const 0) (i32.const 16384) (i32.const 16388)))))
    (if (call $path_is (i32.const 32) (i32.const 6)) (then
      (global.set $evil (i32.const 2))
      (drop (call $get_hdr (i32.const 0) (i32.const 1032) (i32.const 3) (i32.const 16384) (i32.const 16388)))))
    (if (call $path_is (i32.const 48) (i32.const 4)) (then
      (global.set $evil (i32.const 4))
      (drop (call $get_pairs (i32.const 0) (i32.const 16384) (i32.const 16388)))))
    (global.set $evil (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (global.set $evil (i32.const 3))
    (call $check (call $get_buf (i32.const 0) (i32.const 0) (local.get 1) (i32.const 16384) (i32.const 16388)) (i32.const 0))
    (global.set $evil (i32.const 0))
    (call $check (i32.load (i32.const 16400)) (i32.const 1))
    (call $check (i32.load (i32.const 16388)) (i32.const 5))
    (call $check (i32.load8_u (i32.load (i32.const 16384))) (i32.const 104))
    (i32.const 0))
"#;

#[test]
fn an_allocator_that_changes_what_the_host_returns_is_a_guest_error_not_a_panic()
-> anyhow::Result<()> {
    let host = host();
    let wasm = module_with_alloc(EVIL_ALLOC, EVIL);
    for policy in [FailurePolicy::Closed, FailurePolicy::Open] {
        let plugin = host.load("evil", &wasm, b"", Limits::default(), policy)?;
        for path in ["/pairs", "/value", "/far"] {
            let mut ctx = plugin.request_context()?;
            let mut h = headers(&[(":path", path), ("x-a", "1")]);
            let err = ctx.on_request_headers(&mut h, true).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Trap, "{path}: {err}");
            assert!(err.to_string().contains("guest ABI violation"), "{err}");
            // The embedder gets its headers back, and the policy decides.
            assert_eq!(get(&h, ":path"), Some(path.as_bytes()));
            match (policy, policy.action_for(&err)) {
                (FailurePolicy::Closed, Action::LocalResponse(r)) => assert_eq!(r.status, 500),
                (FailurePolicy::Open, Action::Continue) => {}
                other => panic!("{other:?}"),
            }
        }
        // The body is held while the allocator runs: its rewrite finds none,
        // and the guest gets the body as it was.
        let mut ctx = plugin.request_context()?;
        let mut body = BytesMut::from(&b"hello"[..]);
        assert_eq!(ctx.on_request_body(&mut body, true)?, Action::Continue);
        assert_eq!(&body[..], b"hello");
        // Healthy: a plain request goes through.
        let mut ctx = plugin.request_context()?;
        let mut h = headers(&[(":path", "/")]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(plugin.stats().traps, 3);
    }
    Ok(())
}

#[test]
fn shared_data_and_log_lines_are_bounded() -> anyhow::Result<()> {
    let host = PluginHost::new(HostConfig {
        max_instances: 4,
        log_lines_per_second: 5,
        shared_data_max_bytes: 64,
        ..HostConfig::default()
    })?;
    // 50 critical log lines (critical passes any level filter), then two
    // 40-byte values under different keys: the second is past the limit.
    let body = r#"
      (data (i32.const 0) "hello")
      (data (i32.const 16) "k1")
      (data (i32.const 32) "k2")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (local $i i32)
        (loop $l
          (call $check (call $log (i32.const 5) (i32.const 0) (i32.const 5)) (i32.const 0))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 50))))
        (call $check (call $set_shared (i32.const 16) (i32.const 2) (i32.const 100) (i32.const 40) (i32.const 0)) (i32.const 0))
        (call $check (call $set_shared (i32.const 32) (i32.const 2) (i32.const 100) (i32.const 40) (i32.const 0)) (i32.const 10))
        ;; overwriting the first key with as much still fits
        (call $check (call $set_shared (i32.const 16) (i32.const 2) (i32.const 200) (i32.const 40) (i32.const 0)) (i32.const 0))
        (i32.const 0))
    "#;
    let plugin = load(&host, body);
    let mut ctx = plugin.request_context()?;
    assert_eq!(
        ctx.on_request_headers(&mut HeaderList::new(), true)?,
        Action::Continue
    );
    let stats = plugin.stats();
    assert_eq!(stats.logs_suppressed, 45, "{stats:?}");
    assert_eq!(stats.shared_data_rejected, 1);
    assert_eq!(stats.shared_data_bytes, 42);
    assert_eq!(plugin.shared_data().max_bytes(), 64);
    Ok(())
}

/// A load of bytes that a loaded plugin was compiled from reuses its module
/// (a config reload that keeps a plugin's file does not compile it again);
/// other bytes compile, and once no plugin uses a module it is forgotten.
#[test]
fn a_load_of_the_same_bytes_reuses_the_module_while_a_plugin_uses_it() -> anyhow::Result<()> {
    let host = host();
    let stats = |c, r| meridian_wasm_host::ModuleStats {
        compiled: c,
        reused: r,
    };
    let first = load(&host, ADD_HEADER);
    assert_eq!(host.module_stats(), stats(1, 0));
    // A reload: the new generation loads while the old one is still loaded.
    let second = load(&host, ADD_HEADER);
    assert_eq!(host.module_stats(), stats(1, 1));
    // Each load is its own plugin (own instances, config and counters) and works.
    for p in [&first, &second] {
        let mut ctx = p.request_context()?;
        let mut h = headers(&[]);
        assert_eq!(ctx.on_request_headers(&mut h, true)?, Action::Continue);
        assert_eq!(get(&h, "x-added"), Some(&b"yes"[..]));
    }
    assert_eq!(second.stats().callbacks, 1);
    // Other bytes compile.
    let other = load(&host, "");
    assert_eq!(host.module_stats(), stats(2, 1));
    // Once no plugin uses a module, the next load compiles it again.
    drop((first, second));
    let third = load(&host, ADD_HEADER);
    assert_eq!(host.module_stats(), stats(3, 1));
    drop((other, third));
    Ok(())
}
