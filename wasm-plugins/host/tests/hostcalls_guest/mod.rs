//! A guest that runs programs of random hostcalls, for the hostcall fuzz
//! tests: `tests/hostcall_fuzz.rs` (proptest, part of `cargo test`) and the
//! libFuzzer target `fuzz/fuzz_targets/wasm_hostcalls.rs` at the repository's root.
//!
//! A program is a sequence of 44-byte records: a little-endian `u32`
//! opcode and ten `i32` arguments. Opcodes below [`IMPORTS`]`.len()` call
//! that import with the arguments (an `i64` parameter takes the sign-extended
//! argument); the next ones set the allocator's mode, store a word, or grow
//! the memory. The guest reads its program from the request (or response)
//! body, keeps it, and runs it again from its other callbacks.
//!
//! Its allocator (`proxy_on_memory_allocate`) can be made hostile by the
//! program: return a given pointer, trap, return 0, change a header map or
//! a body, call back into the host (re-entrantly), or grow the memory.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meridian_wasm_host::{
    FailurePolicy, HeaderList, HostConfig, HttpCallResponse, Limits, Plugin, PluginHost,
};

/// A small host (4 instances of 4 MiB, generous deadlines) with the guest loaded.
pub fn load() -> meridian_wasm_host::Result<(PluginHost, Plugin)> {
    let host = PluginHost::new(HostConfig {
        max_instances: 4,
        max_memory_bytes: 4 << 20,
        log_lines_per_second: 1000,
        shared_data_max_bytes: 64 << 10,
        ..HostConfig::default()
    })?;
    let wasm = wat::parse_str(wat())
        .map_err(|e| meridian_wasm_host::PluginError::Engine(e.to_string()))?;
    let limits = Limits {
        memory_bytes: 4 << 20,
        callback_deadline: Duration::from_millis(500),
        ..Limits::default()
    };
    let plugin = host.load("fuzz", &wasm, b"{}", limits, FailurePolicy::Open)?;
    Ok((host, plugin))
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderList {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// One request through every callback, as the edge drives them, with
/// `program` as both bodies. Errors (traps, lost instances, refusals) are
/// fine; panics are not.
pub fn run_request(plugin: &Plugin, program: &[u8]) {
    let Ok(mut ctx) = plugin.request_context() else {
        return;
    };
    let mut req = headers(&[
        (":method", "GET"),
        (":path", "/x"),
        (":authority", "a"),
        ("x-key", "v"),
    ]);
    let _ = ctx.on_request_headers(&mut req, false);
    // As the edge does: the request headers stay readable in later phases.
    ctx.keep_request_headers(std::mem::take(&mut req));
    let _ = ctx.on_request_body(&mut BytesMut::from(program), true);
    for call in ctx.take_http_calls() {
        let resp = HttpCallResponse {
            headers: headers(&[(":status", "200")]),
            body: Bytes::from_static(b"ok"),
            trailers: Vec::new(),
        };
        let _ = ctx.on_http_call_response(call.token, Some(resp), &mut req);
    }
    let _ = ctx.on_request_trailers(&mut headers(&[("grpc-status", "0")]));
    let mut resp = headers(&[(":status", "200"), ("server", "o")]);
    let _ = ctx.on_response_headers(&mut resp, false);
    let _ = ctx.on_response_body(&mut BytesMut::from(program), true);
    let _ = ctx.on_log(&mut Vec::new(), &mut resp);
    let _ = ctx.finish();
}

/// An import of the guest: module, name, parameters (`true` = i64) and
/// whether it returns an i32.
pub struct Import {
    pub module: &'static str,
    pub name: &'static str,
    pub params: &'static [bool],
    pub result: bool,
}

const fn imp(
    module: &'static str,
    name: &'static str,
    params: &'static [bool],
    result: bool,
) -> Import {
    Import {
        module,
        name,
        params,
        result,
    }
}

const I: bool = false;
const L: bool = true;
const ENV: &str = "env";
const WASI: &str = "wasi_snapshot_preview1";

/// Every host function the host defines, and one it does not.
pub const IMPORTS: &[Import] = &[
    imp(ENV, "proxy_log", &[I, I, I], true),
    imp(ENV, "proxy_get_log_level", &[I], true),
    imp(ENV, "proxy_get_current_time_nanoseconds", &[I], true),
    imp(ENV, "proxy_set_tick_period_milliseconds", &[I], true),
    imp(ENV, "proxy_get_buffer_bytes", &[I, I, I, I, I], true),
    imp(ENV, "proxy_set_buffer_bytes", &[I, I, I, I, I], true),
    imp(ENV, "proxy_get_buffer_status", &[I, I, I], true),
    imp(ENV, "proxy_get_header_map_pairs", &[I, I, I], true),
    imp(ENV, "proxy_get_header_map_size", &[I, I], true),
    imp(ENV, "proxy_set_header_map_pairs", &[I, I, I], true),
    imp(ENV, "proxy_get_header_map_value", &[I, I, I, I, I], true),
    imp(
        ENV,
        "proxy_replace_header_map_value",
        &[I, I, I, I, I],
        true,
    ),
    imp(ENV, "proxy_add_header_map_value", &[I, I, I, I, I], true),
    imp(ENV, "proxy_remove_header_map_value", &[I, I, I], true),
    imp(ENV, "proxy_get_property", &[I, I, I, I], true),
    imp(ENV, "proxy_set_property", &[I, I, I, I], true),
    imp(
        ENV,
        "proxy_send_local_response",
        &[I, I, I, I, I, I, I, I],
        true,
    ),
    imp(ENV, "proxy_continue_stream", &[I], true),
    imp(ENV, "proxy_continue_request", &[], true),
    imp(ENV, "proxy_continue_response", &[], true),
    imp(ENV, "proxy_close_stream", &[I], true),
    imp(ENV, "proxy_get_shared_data", &[I, I, I, I, I], true),
    imp(ENV, "proxy_set_shared_data", &[I, I, I, I, I], true),
    imp(
        ENV,
        "proxy_http_call",
        &[I, I, I, I, I, I, I, I, I, I],
        true,
    ),
    imp(ENV, "proxy_define_metric", &[I, I, I, I], true),
    imp(ENV, "proxy_increment_metric", &[I, L], true),
    imp(ENV, "proxy_record_metric", &[I, L], true),
    imp(ENV, "proxy_get_metric", &[I, I], true),
    imp(ENV, "proxy_set_effective_context", &[I], true),
    imp(ENV, "proxy_done", &[], true),
    imp(
        ENV,
        "proxy_call_foreign_function",
        &[I, I, I, I, I, I],
        true,
    ),
    imp(ENV, "proxy_register_shared_queue", &[I, I, I], true),
    imp(ENV, "proxy_dequeue_shared_queue", &[I, I, I], true),
    imp(ENV, "proxy_not_a_hostcall", &[I, I], true),
    imp(WASI, "fd_write", &[I, I, I, I], true),
    imp(WASI, "clock_time_get", &[I, L, I], true),
    imp(WASI, "clock_res_get", &[I, I], true),
    imp(WASI, "random_get", &[I, I], true),
    imp(WASI, "environ_sizes_get", &[I, I], true),
    imp(WASI, "args_get", &[I, I], true),
    imp(WASI, "sched_yield", &[], true),
    imp(WASI, "fd_prestat_get", &[I, I], true),
    imp(WASI, "fd_prestat_dir_name", &[I, I, I], true),
    imp(WASI, "proc_exit", &[I], false),
];

/// Opcodes after the imports.
pub const OP_ALLOC_MODE: u32 = IMPORTS.len() as u32;
pub const OP_STORE: u32 = OP_ALLOC_MODE + 1;
pub const OP_GROW: u32 = OP_ALLOC_MODE + 2;
pub const NUM_OPS: u32 = OP_ALLOC_MODE + 3;

/// Allocator modes (`OP_ALLOC_MODE` argument 0; argument 1 is the mode's
/// parameter).
pub const ALLOC_MODES: i32 = 8;

/// Where the guest keeps its program, and the most it keeps.
pub const PROGRAM_AT: i32 = 8192;
pub const PROGRAM_MAX: usize = 8192;
pub const RECORD: usize = 44;

/// Addresses of useful data in the guest (with their lengths), for
/// arguments that are sometimes right.
pub const DATA: &[(i32, i32)] = &[
    (1024, 63), // a serialized map: :method GET, :path /, :authority a
    (2048, 5),  // "x-key"
    (2304, 5),  // "value"
    (2560, 15), // a serialized map: a = 1
    (2816, 12), // "request\0path"
    (16384, 4), // return slots
    (16388, 4),
    (16392, 4),
];

/// One program record.
#[derive(Debug, Clone)]
pub struct Op {
    pub code: u32,
    pub args: [i32; 10],
}

/// The bytes of a program.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ops.len() * RECORD);
    for op in ops {
        out.extend_from_slice(&(op.code % NUM_OPS).to_le_bytes());
        for a in op.args {
            out.extend_from_slice(&a.to_le_bytes());
        }
    }
    out
}

/// The guest's WAT text.
pub fn wat() -> String {
    let mut w = String::from("(module\n");
    for (i, imp) in IMPORTS.iter().enumerate() {
        let params: String = imp
            .params
            .iter()
            .map(|&l| if l { " i64" } else { " i32" })
            .collect();
        let result = if imp.result { " (result i32)" } else { "" };
        let _ = writeln!(
            w,
            "  (import \"{}\" \"{}\" (func $imp{i} (param{params}){result}))",
            imp.module, imp.name
        );
    }
    w.push_str(
        r#"
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (global $mode (mut i32) (i32.const 0))
  (global $marg (mut i32) (i32.const 0))
  (global $depth (mut i32) (i32.const 0))
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 1024) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00a\00")
  (data (i32.const 2048) "x-key")
  (data (i32.const 2304) "value")
  (data (i32.const 2560) "\01\00\00\00\01\00\00\00\01\00\00\00a\001\00")
  (data (i32.const 2816) "request\00path")
  (func $bump (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $n)) (i32.const 65536))
      (then (global.set $heap (i32.const 32768))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (block $normal
      (block $m7 (block $m6 (block $m5 (block $m4 (block $m3 (block $m2 (block $m1 (block $m0
        (br_table $m0 $m1 $m2 $m3 $m4 $m5 $m6 $m7 $normal (global.get $mode)))
        (br $normal))
        (return (global.get $marg)))
        (drop (call $add_hdr (i32.and (global.get $marg) (i32.const 7)) (i32.const 2048) (i32.const 5) (i32.const 2304) (i32.const 5)))
        (br $normal))
        unreachable)
        (return (i32.const 0)))
        (drop (call $set_buf (i32.and (global.get $marg) (i32.const 7)) (i32.const 0) (i32.const 1) (i32.const 2304) (i32.const 5)))
        (br $normal))
        (if (i32.lt_u (global.get $depth) (i32.const 3)) (then
          (global.set $depth (i32.add (global.get $depth) (i32.const 1)))
          (drop (call $get_pairs (i32.and (global.get $marg) (i32.const 7)) (i32.const 16384) (i32.const 16388)))
          (global.set $depth (i32.sub (global.get $depth) (i32.const 1)))))
        (br $normal))
      (drop (memory.grow (i32.const 1))))
    (call $bump (local.get $n)))
  (func (export "proxy_abi_version_0_2_1"))
  (func $fetch (param $buffer i32) (param $size i32)
    (global.set $mode (i32.const 0))
    (global.set $count (i32.const 0))
    (if (i32.ne (call $get_buf (local.get $buffer) (i32.const 0) (local.get $size) (i32.const 16384) (i32.const 16388)) (i32.const 0))
      (then (return)))
    (if (i32.gt_u (i32.load (i32.const 16388)) (i32.const 8192))
      (then (i32.store (i32.const 16388) (i32.const 8192))))
    (memory.copy (i32.const 8192) (i32.load (i32.const 16384)) (i32.load (i32.const 16388)))
    (global.set $count (i32.div_u (i32.load (i32.const 16388)) (i32.const 44))))
  (func $run
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (global.get $count)))
        (call $op (i32.add (i32.const 8192) (i32.mul (local.get $i) (i32.const 44))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $run) (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $fetch (i32.const 0) (local.get 1)) (call $run) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $run) (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (call $fetch (i32.const 1) (local.get 1)) (call $run) (i32.const 0))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
    (call $run) (i32.const 0))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (call $run))
  (func (export "proxy_on_log") (param i32) (call $run))
  (func (export "proxy_on_tick") (param i32) (call $run))
  (func (export "proxy_on_done") (param i32) (result i32) (call $run) (i32.const 1))
"#,
    );
    // Aliases the allocator uses.
    let find = |name: &str| {
        IMPORTS
            .iter()
            .position(|i| i.name == name)
            .expect("known import")
    };
    for (alias, name) in [
        ("add_hdr", "proxy_add_header_map_value"),
        ("set_buf", "proxy_set_buffer_bytes"),
        ("get_pairs", "proxy_get_header_map_pairs"),
        ("get_buf", "proxy_get_buffer_bytes"),
    ] {
        let i = find(name);
        let imp = &IMPORTS[i];
        let params: String = imp.params.iter().map(|_| " i32").collect();
        let args: String = (0..imp.params.len())
            .map(|k| format!(" (local.get {k})"))
            .collect();
        let _ = writeln!(
            w,
            "  (func ${alias} (param{params}) (result i32) (call $imp{i}{args}))"
        );
    }
    // The interpreter: one block per opcode, innermost first.
    w.push_str("  (func $op (param $r i32)\n");
    let n = NUM_OPS as usize;
    w.push_str("    (block $default\n");
    for k in (0..n).rev() {
        let _ = writeln!(w, "    (block $b{k}");
    }
    let targets: String = (0..n).map(|k| format!(" $b{k}")).collect();
    let _ = writeln!(
        w,
        "      (br_table{targets} $default (i32.load (local.get $r))))"
    );
    let arg = |k: usize| format!("(i32.load offset={} (local.get $r))", 4 + 4 * k);
    for k in 0..n {
        if let Some(imp) = IMPORTS.get(k) {
            let args: String = imp
                .params
                .iter()
                .enumerate()
                .map(|(j, &l)| {
                    if l {
                        format!(" (i64.extend_i32_s {})", arg(j))
                    } else {
                        format!(" {}", arg(j))
                    }
                })
                .collect();
            if imp.result {
                let _ = write!(w, "      (drop (call $imp{k}{args}))");
            } else {
                let _ = write!(w, "      (call $imp{k}{args})");
            }
        } else if k as u32 == OP_ALLOC_MODE {
            let _ = write!(
                w,
                "      (global.set $mode {}) (global.set $marg {})",
                arg(0),
                arg(1)
            );
        } else if k as u32 == OP_STORE {
            let _ = write!(
                w,
                "      (i32.store (i32.and {} (i32.const 0xfffc)) {})",
                arg(0),
                arg(1)
            );
        } else {
            let _ = write!(
                w,
                "      (drop (memory.grow (i32.and {} (i32.const 3))))",
                arg(0)
            );
        }
        w.push_str(" (return))\n");
    }
    w.push_str("  )\n)\n");
    w
}
