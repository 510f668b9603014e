//! Fuzz target: the input is a program of hostcalls (44-byte records, see
//! `tests/hostcalls_guest`) that a guest runs from every callback of a
//! request, with its allocator possibly hostile. The host must never panic.
#![no_main]

#[path = "../../wasm-plugins/host/tests/hostcalls_guest/mod.rs"]
mod hostcalls_guest;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meridian_wasm_host::{Plugin, PluginHost};

fn plugin() -> &'static (PluginHost, Plugin) {
    static P: OnceLock<(PluginHost, Plugin)> = OnceLock::new();
    P.get_or_init(|| hostcalls_guest::load().expect("the fuzz guest loads"))
}

fuzz_target!(|program: &[u8]| {
    let (_, plugin) = plugin();
    // Opcodes are taken modulo the number of operations.
    let mut program = program.to_vec();
    for record in program.chunks_mut(hostcalls_guest::RECORD) {
        if record.len() >= 4 {
            let code = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
            record[..4].copy_from_slice(&(code % hostcalls_guest::NUM_OPS).to_le_bytes());
        }
    }
    hostcalls_guest::run_request(plugin, &program);
    let _ = plugin.on_tick();
    assert_eq!(
        plugin.stats().live_contexts,
        0,
        "a context outlived its request"
    );
});
