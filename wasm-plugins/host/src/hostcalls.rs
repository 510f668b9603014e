//! The functions the host exports to guests: proxy-wasm 0.2.1 in module `env`
//! and a minimal WASI preview1 in `wasi_snapshot_preview1`.
//!
//! Rules every hostcall follows: each guest pointer/length pair is checked
//! against the current memory size before use (failure → `InvalidMemoryAccess`
//! or WASI `FAULT`), return slots are checked *before* guest memory is
//! allocated for a result, and nothing here panics on guest input.
//!
//! Data returned to the guest is made (serialized, copied or held) *before*
//! the guest's allocator runs, and exactly that is written afterwards: the
//! allocator is guest code, and may call back into the host and change the
//! very map or buffer being returned. The region it returns is checked; one
//! outside the guest's memory is a guest error ([`GuestViolation`]), which
//! traps the guest. The only errors that unwind the guest are that, a trap
//! inside the guest allocator, and `proc_exit`.
//!
//! What a guest can make the host hold is bounded: header maps it grows
//! ([`MAX_MAP_BYTES`]), bodies it grows and HTTP calls it queues
//! ([`MAX_GUEST_BODY_BYTES`]), properties it sets ([`MAX_PROPERTY_BYTES`]),
//! metric names, log lines ([`MAX_LOG_LINE_BYTES`]), and, per plugin, the
//! shared data and the log rate (see [`crate::HostConfig`]).

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::{Caller, ExternType, IntoFunc, Linker, Module, Val, ValType};

use crate::abi::{
    self, BufferType, HeaderEdit, HeaderList, LogLevel, MapType, MetricKind, Status,
    decode_header_map, encode_header_map_into, encoded_header_map_len, errno,
};
use crate::instance::{HostState, ProcExit, Signal};
use crate::plugin::{HttpCallRequest, LocalResponse};
use crate::ratelimit::Admit;

type C<'a> = Caller<'a, HostState>;
type HResult<T> = wasmtime::Result<T>;

const ENV: &str = "env";
const WASI: &str = "wasi_snapshot_preview1";

const MAX_PENDING_HTTP_CALLS: usize = 64;
const MAX_SET_PROPERTIES: usize = 256;
const MAX_RANDOM_BYTES: u32 = 64 * 1024;
/// A header map (or trailers) may not be grown by a guest past this
/// serialized size (or past its size when the host handed it over, if larger).
pub(crate) const MAX_MAP_BYTES: usize = 1 << 20;
/// A body may not be grown by a guest past this (or past its size when the
/// host handed it over, if larger); nor may its queued HTTP calls' bodies.
pub(crate) const MAX_GUEST_BODY_BYTES: usize = 64 << 20;
/// Properties a guest sets (`proxy_set_property`), names and values together.
pub(crate) const MAX_PROPERTY_BYTES: usize = 1 << 20;
/// A metric name.
const MAX_METRIC_NAME_BYTES: usize = 1024;
/// A log line is cut here.
pub(crate) const MAX_LOG_LINE_BYTES: usize = 16 * 1024;
/// The host's scratch buffer is kept between calls up to this capacity.
const MAX_SCRATCH_BYTES: usize = 64 * 1024;

/// A guest broke the ABI in a way that leaves no sane status to return
/// (its allocator returned a region outside its memory): the guest traps.
#[derive(Debug, thiserror::Error)]
#[error("guest ABI violation: {0}")]
pub(crate) struct GuestViolation(String);

// ---- guest memory access -------------------------------------------------

fn range(ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    Some(start..end)
}

fn slice(mem: &[u8], ptr: i32, len: i32) -> Result<&[u8], Status> {
    range(ptr, len)
        .and_then(|r| mem.get(r))
        .ok_or(Status::InvalidMemoryAccess)
}

fn slice_mut(mem: &mut [u8], ptr: i32, len: i32) -> Result<&mut [u8], Status> {
    range(ptr, len)
        .and_then(|r| mem.get_mut(r))
        .ok_or(Status::InvalidMemoryAccess)
}

fn put_u32(mem: &mut [u8], ptr: i32, v: u32) -> Result<(), Status> {
    slice_mut(mem, ptr, 4)?.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn put_u64(mem: &mut [u8], ptr: i32, v: u64) -> Result<(), Status> {
    slice_mut(mem, ptr, 8)?.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn code(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok.code(),
        Err(s) => s.code(),
    }
}

/// Run `f` with the guest memory and the host state borrowed together.
fn with_mem<R>(
    c: &mut C<'_>,
    f: impl FnOnce(&mut [u8], &mut HostState) -> Result<R, Status>,
) -> Result<R, Status> {
    let memory = c.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let (mem, st) = memory.data_and_store_mut(c);
    f(mem, st)
}

/// Return `data` to the guest: allocate `data.len()` bytes with the guest's
/// allocator, copy `data` there, and store pointer and size at
/// `ret_ptr`/`ret_size`. `data` is made before the allocator runs and is
/// written as it is. The return slots are validated first so that a bad
/// pointer does not leak guest memory. An allocator that changed a header
/// map or a body meanwhile (so `data` no longer matches them), or returned a
/// region outside the guest's memory, traps the guest.
fn return_bytes(c: &mut C<'_>, ret_ptr: i32, ret_size: i32, data: &[u8]) -> HResult<i32> {
    let Some(memory) = c.data().memory else {
        return Ok(Status::InvalidMemoryAccess.code());
    };
    {
        let mem = memory.data(&*c);
        if slice(mem, ret_ptr, 4).is_err() || slice(mem, ret_size, 4).is_err() {
            return Ok(Status::InvalidMemoryAccess.code());
        }
    }
    let Ok(len32) = i32::try_from(data.len()) else {
        return Ok(Status::InternalFailure.code());
    };
    let Some(alloc) = c.data().alloc.clone() else {
        return Ok(Status::InternalFailure.code());
    };
    let version = c.data().version;
    let ptr = alloc.call(&mut *c, len32)?;
    if c.data().version != version {
        return Err(GuestViolation(
            "the allocator changed a header map or a body while the host was returning data".into(),
        )
        .into());
    }
    if ptr == 0 && !data.is_empty() {
        return Ok(Status::InternalFailure.code());
    }
    // Memory never shrinks: the return slots are still in bounds.
    let mem = memory.data_mut(&mut *c);
    let Ok(dst) = slice_mut(mem, ptr, len32) else {
        return Err(GuestViolation(format!(
            "the allocator returned {} bytes at {:#x}, outside the {} bytes of memory",
            data.len(),
            ptr as u32,
            mem.len()
        ))
        .into());
    };
    dst.copy_from_slice(data);
    let r = put_u32(mem, ret_ptr, ptr as u32).and_then(|()| put_u32(mem, ret_size, len32 as u32));
    Ok(code(r))
}

/// Return what `fill` writes into the host's scratch buffer (reused between
/// calls, so returning a map or a value allocates nothing on the host).
fn return_scratch(
    c: &mut C<'_>,
    ret_ptr: i32,
    ret_size: i32,
    fill: impl FnOnce(&mut C<'_>, &mut Vec<u8>) -> Result<(), Status>,
) -> HResult<i32> {
    // Taken out: a re-entrant call (from the guest's allocator) gets its own.
    let mut buf = std::mem::take(&mut c.data_mut().scratch);
    buf.clear();
    let r = match fill(c, &mut buf) {
        Ok(()) => return_bytes(c, ret_ptr, ret_size, &buf),
        Err(s) => Ok(s.code()),
    };
    if buf.capacity() <= MAX_SCRATCH_BYTES {
        c.data_mut().scratch = buf;
    }
    r
}

fn return_slice(c: &mut C<'_>, ret_ptr: i32, ret_size: i32, data: &[u8]) -> HResult<i32> {
    return_bytes(c, ret_ptr, ret_size, data)
}

fn read_string(mem: &[u8], ptr: i32, len: i32) -> Result<String, Status> {
    let b = slice(mem, ptr, len)?;
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| Status::BadArgument)
}

/// A header name (lower-cased) and value from guest memory.
fn read_header(
    mem: &[u8],
    kptr: i32,
    klen: i32,
    vptr: i32,
    vlen: i32,
) -> Result<(String, Vec<u8>), Status> {
    let mut key = read_string(mem, kptr, klen)?;
    key.make_ascii_lowercase();
    Ok((key, slice(mem, vptr, vlen)?.to_vec()))
}

fn header_pos(map: &HeaderList, key: &[u8]) -> Option<usize> {
    map.iter()
        .position(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key))
}

fn map_type(t: i32) -> Result<MapType, Status> {
    MapType::from_i32(t).ok_or(Status::BadArgument)
}

/// Refuses a change that would grow `map` past [`MAX_MAP_BYTES`] (or past
/// its size before the change, if that is larger).
fn check_map_growth(before: usize, after: usize) -> Result<(), Status> {
    if after > before.max(MAX_MAP_BYTES) {
        return Err(Status::InternalFailure);
    }
    Ok(())
}

/// The size of one pair in a serialized map.
fn pair_len(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + 10
}

/// A guest log line of `total` bytes, of which `bytes` are at hand, cut at
/// [`MAX_LOG_LINE_BYTES`].
fn log_text(bytes: &[u8], total: u64) -> std::borrow::Cow<'_, str> {
    let kept = &bytes[..bytes.len().min(MAX_LOG_LINE_BYTES)];
    let text = String::from_utf8_lossy(kept);
    match total.saturating_sub(kept.len() as u64) {
        0 => text,
        cut => format!("{text}... [{cut} bytes cut]").into(),
    }
}

/// Whether a guest's log line at `level` may be emitted: it must pass the
/// subscriber's level (a filtered line costs nothing) and the plugin's rate
/// limit; lines over the limit are counted, and the next line emitted says
/// how many were dropped.
fn admit_log(st: &HostState, level: LogLevel) -> bool {
    if level < current_log_level() {
        return false;
    }
    let verdict = st.plugin.log_bucket.lock().admit(Instant::now());
    match verdict {
        Admit::Yes { suppressed } => {
            if suppressed > 0 {
                tracing::warn!(
                    plugin = %st.plugin.name,
                    suppressed,
                    "plugin log lines dropped by the rate limit"
                );
            }
            true
        }
        Admit::No => {
            st.plugin
                .stats
                .logs_suppressed
                .fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

// ---- registration ----------------------------------------------------------

/// Registers host functions, remembering their names so that unknown imports
/// can be stubbed.
struct Defs<'a> {
    linker: &'a mut Linker<HostState>,
    names: HashSet<(&'static str, &'static str)>,
}

impl Defs<'_> {
    fn wrap<P, R>(
        &mut self,
        module: &'static str,
        name: &'static str,
        f: impl IntoFunc<HostState, P, R>,
    ) -> HResult<()> {
        self.linker.func_wrap(module, name, f)?;
        self.names.insert((module, name));
        Ok(())
    }
}

/// The names `add_to_linker` defines.
pub(crate) type Defined = HashSet<(&'static str, &'static str)>;

/// Satisfy every function import the linker does not define with a stub that
/// returns `Unimplemented` (12), or `NOSYS` (52) for WASI, in its first i32
/// result (other results get zero values). Non-function imports are an error.
pub(crate) fn stub_unknown_imports(
    linker: &mut Linker<HostState>,
    defined: &Defined,
    module: &Module,
) -> Result<Vec<String>, String> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        if defined.contains(&(import.module(), import.name())) {
            continue;
        }
        let ExternType::Func(ty) = import.ty() else {
            return Err(format!(
                "unsupported non-function import {}.{}",
                import.module(),
                import.name()
            ));
        };
        let wasi = import.module().starts_with("wasi");
        let status = if wasi {
            errno::NOSYS
        } else {
            Status::Unimplemented.code()
        };
        let mut results = Vec::new();
        let mut first_i32 = true;
        for r in ty.results() {
            let v = match r {
                ValType::I32 if first_i32 => {
                    first_i32 = false;
                    Val::I32(status)
                }
                other => Val::default_for_ty(&other).ok_or_else(|| {
                    format!(
                        "cannot stub {}.{}: non-nullable result",
                        import.module(),
                        import.name()
                    )
                })?,
            };
            results.push(v);
        }
        let label = format!("{}.{}", import.module(), import.name());
        stubbed.push(label.clone());
        linker
            .func_new(
                import.module(),
                import.name(),
                ty.clone(),
                move |_c, _params, out| {
                    tracing::debug!(import = %label, "unimplemented hostcall");
                    for (slot, v) in out.iter_mut().zip(&results) {
                        *slot = *v;
                    }
                    Ok(())
                },
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(stubbed)
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> HResult<Defined> {
    let mut d = Defs {
        linker,
        names: HashSet::new(),
    };
    add_proxy(&mut d)?;
    add_wasi(&mut d)?;
    Ok(d.names)
}

fn emit_log(plugin: &str, level: LogLevel, msg: &str) {
    match level {
        LogLevel::Trace => tracing::trace!(plugin, "{msg}"),
        LogLevel::Debug => tracing::debug!(plugin, "{msg}"),
        LogLevel::Info => tracing::info!(plugin, "{msg}"),
        LogLevel::Warn => tracing::warn!(plugin, "{msg}"),
        LogLevel::Error | LogLevel::Critical => tracing::error!(plugin, "{msg}"),
    }
}

fn current_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        LevelFilter::ERROR => LogLevel::Error,
        _ => LogLevel::Critical,
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn monotonic_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Randomness for `random_get`: SipHash with per-process random keys over a
/// counter. Unpredictable to guests, but not a vetted CSPRNG.
fn fill_random(dst: &mut [u8]) {
    static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = STATE.get_or_init(Default::default);
    for chunk in dst.chunks_mut(8) {
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
    }
}

/// Built-in properties, then `proxy_set_property` values, then the
/// request-scoped resolver, then the host-wide one.
fn resolve_property(st: &HostState, raw: &[u8]) -> Option<Vec<u8>> {
    if let Some((_, v)) = st.ctx.properties.iter().find(|(k, _)| k == raw) {
        return Some(v.clone());
    }
    let path = abi::split_property_path(raw);
    let header = |name: &str| -> Option<Vec<u8>> {
        let map = st.map(MapType::RequestHeaders)?;
        header_pos(map, name.as_bytes()).map(|i| map[i].1.clone())
    };
    let builtin = match path.as_slice() {
        ["plugin_name"] => Some(st.plugin.name.as_bytes().to_vec()),
        ["plugin_root_id"] => Some(st.plugin.name.as_bytes().to_vec()),
        ["request", "path"] => header(":path"),
        ["request", "method"] => header(":method"),
        ["request", "host"] => header(":authority"),
        ["request", "scheme"] => header(":scheme"),
        ["request", "headers", name] => header(name),
        ["request", "headers"] => st
            .map(MapType::RequestHeaders)
            .and_then(|m| abi::encode_header_map(m).ok()),
        _ => None,
    };
    builtin
        .or_else(|| {
            st.ctx
                .request_properties
                .as_ref()
                .and_then(|r| r.property(&path))
        })
        .or_else(|| {
            st.plugin
                .host_properties
                .as_ref()
                .and_then(|r| r.property(&path))
        })
}

fn add_proxy(d: &mut Defs<'_>) -> HResult<()> {
    // ---- logging, time, timers
    d.wrap(
        ENV,
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> i32 {
            let Some(level) = LogLevel::from_i32(level) else {
                return Status::BadArgument.code();
            };
            code(with_mem(&mut c, |mem, st| {
                let msg = slice(mem, ptr, len)?;
                if admit_log(st, level) {
                    emit_log(&st.plugin.name, level, &log_text(msg, msg.len() as u64));
                }
                Ok(())
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> i32 {
            code(with_mem(&mut c, |mem, _| {
                put_u32(mem, ret, current_log_level() as u32)
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> i32 {
            code(with_mem(&mut c, |mem, _| put_u64(mem, ret, now_nanos())))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |c: C<'_>, ms: i32| -> i32 {
            c.data()
                .plugin
                .tick_period_ms
                .store(ms as u32, Ordering::Relaxed);
            Status::Ok.code()
        },
    )?;

    // ---- buffers
    d.wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> HResult<i32> {
            let Some(bt) = BufferType::from_i32(t) else {
                return Ok(Status::BadArgument.code());
            };
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            // Held (not copied) while the guest's allocator runs.
            let Some(held) = hold_buffer(c.data_mut(), bt) else {
                return Ok(Status::NotFound.code());
            };
            let total = held.len();
            let r = if start > total {
                Ok(Status::BadArgument.code())
            } else {
                match max.min(total - start) {
                    0 => Ok(Status::Ok.code()),
                    len => return_bytes(&mut c, ret_ptr, ret_size, &held[start..start + len]),
                }
            };
            restore_buffer(c.data_mut(), held);
            r
        },
    )?;
    d.wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, size: i32, ptr: i32, len: i32| -> i32 {
            let Some(bt) = BufferType::from_i32(t) else {
                return Status::BadArgument.code();
            };
            code(with_mem(&mut c, |mem, st| {
                let value = slice(mem, ptr, len)?;
                let buf = match bt {
                    BufferType::RequestBody => st.ctx.request_body.as_mut(),
                    BufferType::ResponseBody => st.ctx.response_body.as_mut(),
                    _ => return Err(Status::BadArgument),
                }
                .ok_or(Status::NotFound)?;
                // Replace [start, start+size) (clamped) with value: covers
                // prepend, append, inject and replace.
                let start = (start as u32 as usize).min(buf.len());
                let end = start.saturating_add(size as u32 as usize).min(buf.len());
                let new_len = buf.len() - (end - start) + value.len();
                if new_len > buf.len().max(MAX_GUEST_BODY_BYTES) {
                    return Err(Status::InternalFailure);
                }
                let mut out = bytes::BytesMut::with_capacity(new_len);
                st.version = st.version.wrapping_add(1);
                out.extend_from_slice(&buf[..start]);
                out.extend_from_slice(value);
                out.extend_from_slice(&buf[end..]);
                *buf = out;
                Ok(())
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_buffer_status",
        |mut c: C<'_>, t: i32, ret_size: i32, ret_flags: i32| -> i32 {
            let Some(bt) = BufferType::from_i32(t) else {
                return Status::BadArgument.code();
            };
            code(with_mem(&mut c, |mem, st| {
                let len = buffer(st, bt).ok_or(Status::NotFound)?.len();
                put_u32(mem, ret_size, len as u32)?;
                put_u32(mem, ret_flags, 0)
            }))
        },
    )?;

    // ---- header maps
    d.wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, t: i32, ret_ptr: i32, ret_size: i32| -> HResult<i32> {
            let mt = match map_type(t) {
                Ok(m) => m,
                Err(s) => return Ok(s.code()),
            };
            // Serialized once, before the guest's allocator runs.
            return_scratch(&mut c, ret_ptr, ret_size, |c, buf| {
                let map = c.data().map(mt).ok_or(Status::NotFound)?;
                buf.resize(encoded_header_map_len(map), 0);
                encode_header_map_into(map, buf).map_err(|_| Status::SerializationFailure)
            })
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: C<'_>, t: i32, ret_size: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let map = st.map(map_type(t)?).ok_or(Status::NotFound)?;
                put_u32(mem, ret_size, encoded_header_map_len(map) as u32)
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, t: i32, ptr: i32, len: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let mt = map_type(t)?;
                let mut pairs =
                    decode_header_map(slice(mem, ptr, len)?).map_err(|_| Status::BadArgument)?;
                for (k, _) in &mut pairs {
                    k.make_ascii_lowercase();
                }
                let map = st.map_mut(mt).ok_or(Status::NotFound)?;
                check_map_growth(encoded_header_map_len(map), len as u32 as usize)?;
                *map = pairs;
                st.log_edit(mt, HeaderEdit::ReplaceAll);
                Ok(())
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: C<'_>, t: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32| -> HResult<i32> {
            // Copied once, before the guest's allocator runs.
            return_scratch(&mut c, ret_ptr, ret_size, |c, buf| {
                with_mem(c, |mem, st| {
                    let mt = map_type(t)?;
                    let key = slice(mem, kptr, klen)?;
                    let map = st.map(mt).ok_or(Status::NotFound)?;
                    let i = header_pos(map, key).ok_or(Status::NotFound)?;
                    buf.extend_from_slice(&map[i].1);
                    Ok(())
                })
            })
        },
    )?;
    d.wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, t: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let mt = map_type(t)?;
                let (key, value) = read_header(mem, kptr, klen, vptr, vlen)?;
                let edit =
                    HostState::tracks(mt).then(|| HeaderEdit::Replace(key.clone(), value.clone()));
                let map = st.map_mut(mt).ok_or(Status::NotFound)?;
                let before = encoded_header_map_len(map);
                let pos = header_pos(map, key.as_bytes());
                let after = match pos {
                    Some(i) => (before - map[i].1.len()).saturating_add(value.len()),
                    None => before.saturating_add(pair_len(&key, &value)),
                };
                check_map_growth(before, after)?;
                match pos {
                    Some(i) => {
                        map[i].1 = value;
                        let mut n = 0;
                        map.retain(|(k, _)| {
                            n += 1;
                            n - 1 <= i || !k.eq_ignore_ascii_case(&key)
                        });
                    }
                    None => map.push((key, value)),
                }
                if let Some(e) = edit {
                    st.log_edit(mt, e);
                }
                Ok(())
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: C<'_>, t: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let mt = map_type(t)?;
                let (key, value) = read_header(mem, kptr, klen, vptr, vlen)?;
                let map = st.map_mut(mt).ok_or(Status::NotFound)?;
                let before = encoded_header_map_len(map);
                check_map_growth(before, before.saturating_add(pair_len(&key, &value)))?;
                let edit =
                    HostState::tracks(mt).then(|| HeaderEdit::Add(key.clone(), value.clone()));
                map.push((key, value));
                if let Some(e) = edit {
                    st.log_edit(mt, e);
                }
                Ok(())
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: C<'_>, t: i32, kptr: i32, klen: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let mt = map_type(t)?;
                let key = slice(mem, kptr, klen)?;
                st.map_mut(mt)
                    .ok_or(Status::NotFound)?
                    .retain(|(k, _)| !k.as_bytes().eq_ignore_ascii_case(key));
                if HostState::tracks(mt) {
                    let name = String::from_utf8_lossy(key).to_ascii_lowercase();
                    st.log_edit(mt, HeaderEdit::Remove(name));
                }
                Ok(())
            }))
        },
    )?;

    // ---- properties
    d.wrap(
        ENV,
        "proxy_get_property",
        |mut c: C<'_>, pptr: i32, plen: i32, ret_ptr: i32, ret_size: i32| -> HResult<i32> {
            let value = with_mem(&mut c, |mem, st| {
                let path = slice(mem, pptr, plen)?;
                resolve_property(st, path).ok_or(Status::NotFound)
            });
            match value {
                Ok(v) => return_slice(&mut c, ret_ptr, ret_size, &v),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    d.wrap(
        ENV,
        "proxy_set_property",
        |mut c: C<'_>, pptr: i32, plen: i32, vptr: i32, vlen: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let path = slice(mem, pptr, plen)?;
                let value = slice(mem, vptr, vlen)?;
                let props = &mut st.ctx.properties;
                let pos = props.iter().position(|(k, _)| k == path);
                let held: usize = props.iter().map(|(k, v)| k.len() + v.len()).sum();
                let after = match pos {
                    Some(i) => held - props[i].1.len() + value.len(),
                    None => held + path.len() + value.len(),
                };
                if after > MAX_PROPERTY_BYTES {
                    return Err(Status::InternalFailure);
                }
                match pos {
                    Some(i) => props[i].1 = value.to_vec(),
                    None if props.len() < MAX_SET_PROPERTIES => {
                        props.push((path.to_vec(), value.to_vec()));
                    }
                    None => return Err(Status::InternalFailure),
                }
                Ok(())
            }))
        },
    )?;

    // ---- stream control
    d.wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc: i32|
         -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let details = String::from_utf8_lossy(slice(mem, dptr, dlen)?).into_owned();
                let body = Bytes::copy_from_slice(slice(mem, bptr, blen)?);
                let headers =
                    decode_header_map(slice(mem, hptr, hlen)?).map_err(|_| Status::BadArgument)?;
                let status = u16::try_from(status)
                    .ok()
                    .filter(|s| (100..=999).contains(s))
                    .ok_or(Status::BadArgument)?;
                st.ctx.local_response = Some(LocalResponse {
                    status,
                    details,
                    headers,
                    body,
                    grpc_status: (grpc >= 0).then_some(grpc),
                });
                Ok(())
            }))
        },
    )?;
    fn continue_stream(c: &mut C<'_>, t: i32) -> i32 {
        let sig = match t {
            0 => Signal::ContinueRequest,
            1 => Signal::ContinueResponse,
            2 | 3 => return Status::Unimplemented.code(),
            _ => return Status::BadArgument.code(),
        };
        c.data_mut().ctx.signal = Some(sig);
        Status::Ok.code()
    }
    d.wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: C<'_>, t: i32| -> i32 { continue_stream(&mut c, t) },
    )?;
    // ABI 0.1.0 names still linked by older SDK builds.
    d.wrap(ENV, "proxy_continue_request", |mut c: C<'_>| -> i32 {
        continue_stream(&mut c, 0)
    })?;
    d.wrap(ENV, "proxy_continue_response", |mut c: C<'_>| -> i32 {
        continue_stream(&mut c, 1)
    })?;
    d.wrap(ENV, "proxy_close_stream", |mut c: C<'_>, t: i32| -> i32 {
        match t {
            0 | 1 => {
                c.data_mut().ctx.signal = Some(Signal::Close);
                Status::Ok.code()
            }
            2 | 3 => Status::Unimplemented.code(),
            _ => Status::BadArgument.code(),
        }
    })?;

    // ---- shared data
    d.wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: C<'_>,
         kptr: i32,
         klen: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32|
         -> HResult<i32> {
            let found = with_mem(&mut c, |mem, st| {
                slice(mem, ret_cas, 4)?;
                let key = std::str::from_utf8(slice(mem, kptr, klen)?)
                    .map_err(|_| Status::BadArgument)?;
                st.plugin.shared_data.get(key).ok_or(Status::NotFound)
            });
            let (value, cas) = match found {
                Ok(v) => v,
                Err(s) => return Ok(s.code()),
            };
            let r = return_slice(&mut c, ret_ptr, ret_size, &value)?;
            if r != Status::Ok.code() {
                return Ok(r);
            }
            Ok(code(with_mem(&mut c, |mem, _| put_u32(mem, ret_cas, cas))))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let key = std::str::from_utf8(slice(mem, kptr, klen)?)
                    .map_err(|_| Status::BadArgument)?;
                let value = slice(mem, vptr, vlen)?;
                st.plugin
                    .shared_data
                    .set(key, value, cas as u32)
                    .map(|_| ())
            }))
        },
    )?;

    // ---- HTTP calls
    d.wrap(
        ENV,
        "proxy_http_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout: i32,
         ret_token: i32|
         -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let upstream = read_string(mem, uptr, ulen)?;
                let headers =
                    decode_header_map(slice(mem, hptr, hlen)?).map_err(|_| Status::BadArgument)?;
                let body = Bytes::copy_from_slice(slice(mem, bptr, blen)?);
                let trailers =
                    decode_header_map(slice(mem, tptr, tlen)?).map_err(|_| Status::BadArgument)?;
                slice(mem, ret_token, 4)?;
                for required in [":method", ":path", ":authority"] {
                    if header_pos(&headers, required.as_bytes()).is_none() {
                        return Err(Status::BadArgument);
                    }
                }
                // Only request contexts can receive the response for now.
                let queued: usize = st.ctx.http_calls.iter().map(|c| c.body.len()).sum();
                if st.request_id.is_none()
                    || st.ctx.http_calls.len() >= MAX_PENDING_HTTP_CALLS
                    || queued + body.len() > MAX_GUEST_BODY_BYTES
                {
                    return Err(Status::InternalFailure);
                }
                let token = st.next_http_token;
                st.next_http_token = st.next_http_token.wrapping_add(1).max(1);
                st.ctx.http_calls.push(HttpCallRequest {
                    token,
                    upstream,
                    headers,
                    body,
                    trailers,
                    timeout: Duration::from_millis(u64::from(timeout as u32)),
                });
                put_u32(mem, ret_token, token)
            }))
        },
    )?;

    // ---- metrics
    d.wrap(
        ENV,
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, nptr: i32, nlen: i32, ret_id: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let kind = MetricKind::from_i32(kind).ok_or(Status::BadArgument)?;
                let name = std::str::from_utf8(slice(mem, nptr, nlen)?)
                    .map_err(|_| Status::BadArgument)?;
                if name.len() > MAX_METRIC_NAME_BYTES {
                    return Err(Status::BadArgument);
                }
                slice(mem, ret_id, 4)?;
                let id = st.plugin.metrics.define(kind, name)?;
                put_u32(mem, ret_id, id)
            }))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| -> i32 {
            code(c.data().plugin.metrics.increment(id as u32, delta))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| -> i32 {
            code(c.data().plugin.metrics.record(id as u32, value as u64))
        },
    )?;
    d.wrap(
        ENV,
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> i32 {
            code(with_mem(&mut c, |mem, st| {
                let v = st.plugin.metrics.value(id as u32)?;
                put_u64(mem, ret, v)
            }))
        },
    )?;

    // ---- context management
    d.wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> i32 {
            let st = c.data_mut();
            let id = id as u32;
            if id == st.root_id || Some(id) == st.request_id {
                st.effective_id = id;
                Status::Ok.code()
            } else {
                Status::BadArgument.code()
            }
        },
    )?;
    d.wrap(ENV, "proxy_done", |mut c: C<'_>| -> i32 {
        let st = c.data_mut();
        if st.ctx.done_pending {
            st.ctx.done_pending = false;
            Status::Ok.code()
        } else {
            Status::NotFound.code()
        }
    })?;
    d.wrap(
        ENV,
        "proxy_call_foreign_function",
        |_c: C<'_>, _n: i32, _nl: i32, _a: i32, _al: i32, _rp: i32, _rs: i32| -> i32 {
            Status::Unimplemented.code()
        },
    )?;

    // ---- shared queues: not implemented yet (the guest sees Unimplemented).
    d.wrap(
        ENV,
        "proxy_register_shared_queue",
        |_c: C<'_>, _n: i32, _l: i32, _r: i32| -> i32 { Status::Unimplemented.code() },
    )?;
    d.wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |_c: C<'_>, _v: i32, _vl: i32, _n: i32, _l: i32, _r: i32| -> i32 {
            Status::Unimplemented.code()
        },
    )?;
    d.wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |_c: C<'_>, _q: i32, _v: i32, _l: i32| -> i32 { Status::Unimplemented.code() },
    )?;
    d.wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |_c: C<'_>, _q: i32, _p: i32, _s: i32| -> i32 { Status::Unimplemented.code() },
    )?;
    Ok(())
}

fn buffer(st: &HostState, bt: BufferType) -> Option<&[u8]> {
    match bt {
        BufferType::RequestBody => st.ctx.request_body.as_deref(),
        BufferType::ResponseBody => st.ctx.response_body.as_deref(),
        BufferType::HttpCallResponseBody => st.ctx.http_call_body.as_deref(),
        BufferType::VmConfiguration => Some(&st.plugin.vm_config),
        BufferType::PluginConfiguration => Some(&st.plugin.plugin_config),
        _ => None,
    }
}

/// A buffer held outside the host state while the guest's allocator runs:
/// a body is moved out (the guest sees none meanwhile), the others are
/// shared `Bytes`. Nothing is copied.
enum Held {
    Body(BufferType, bytes::BytesMut),
    Shared(Bytes),
}

impl std::ops::Deref for Held {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Body(_, b) => b,
            Self::Shared(b) => b,
        }
    }
}

fn hold_buffer(st: &mut HostState, bt: BufferType) -> Option<Held> {
    let ctx = &mut st.ctx;
    Some(match bt {
        BufferType::RequestBody => Held::Body(bt, ctx.request_body.take()?),
        BufferType::ResponseBody => Held::Body(bt, ctx.response_body.take()?),
        BufferType::HttpCallResponseBody => Held::Shared(ctx.http_call_body.clone()?),
        BufferType::VmConfiguration => Held::Shared(st.plugin.vm_config.clone()),
        BufferType::PluginConfiguration => Held::Shared(st.plugin.plugin_config.clone()),
        _ => return None,
    })
}

fn restore_buffer(st: &mut HostState, held: Held) {
    match held {
        Held::Body(BufferType::RequestBody, b) => st.ctx.request_body = Some(b),
        Held::Body(_, b) => st.ctx.response_body = Some(b),
        Held::Shared(_) => {}
    }
}

fn add_wasi(d: &mut Defs<'_>) -> HResult<()> {
    fn wasi_code(r: Result<(), Status>) -> i32 {
        match r {
            Ok(()) => errno::SUCCESS,
            Err(_) => errno::FAULT,
        }
    }
    d.wrap(
        WASI,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, ret_written: i32| -> i32 {
            let level = match fd {
                1 => LogLevel::Info,
                2 => LogLevel::Error,
                _ => return errno::BADF,
            };
            wasi_code(with_mem(&mut c, |mem, st| {
                let n = iovs_len as u32 as usize;
                let table = slice(
                    mem,
                    iovs,
                    i32::try_from(n.checked_mul(8).ok_or(Status::BadArgument)?)
                        .map_err(|_| Status::BadArgument)?,
                )?;
                // At most MAX_LOG_LINE_BYTES are kept, however many iovecs
                // point wherever.
                let mut msg = Vec::new();
                let mut written = 0u64;
                for iov in table.chunks_exact(8) {
                    let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                    let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                    let data = slice(mem, ptr, len)?;
                    written = written.saturating_add(data.len() as u64);
                    let room = MAX_LOG_LINE_BYTES.saturating_sub(msg.len());
                    msg.extend_from_slice(&data[..data.len().min(room)]);
                }
                slice(mem, ret_written, 4)?;
                if admit_log(st, level) {
                    let text = log_text(&msg, written);
                    emit_log(&st.plugin.name, level, text.trim_end_matches('\n'));
                }
                put_u32(mem, ret_written, u32::try_from(written).unwrap_or(u32::MAX))
            }))
        },
    )?;
    d.wrap(
        WASI,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| -> i32 {
            let t = match id {
                0 => now_nanos(),
                1 => monotonic_nanos(),
                _ => return errno::NOTSUP,
            };
            wasi_code(with_mem(&mut c, |mem, _| put_u64(mem, ret, t)))
        },
    )?;
    d.wrap(
        WASI,
        "clock_res_get",
        |mut c: C<'_>, id: i32, ret: i32| -> i32 {
            if !(0..=1).contains(&id) {
                return errno::NOTSUP;
            }
            wasi_code(with_mem(&mut c, |mem, _| put_u64(mem, ret, 1)))
        },
    )?;
    d.wrap(
        WASI,
        "random_get",
        |mut c: C<'_>, ptr: i32, len: i32| -> i32 {
            if len as u32 > MAX_RANDOM_BYTES {
                return errno::INVAL;
            }
            wasi_code(with_mem(&mut c, |mem, _| {
                fill_random(slice_mut(mem, ptr, len)?);
                Ok(())
            }))
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        d.wrap(
            WASI,
            name,
            |mut c: C<'_>, ret_count: i32, ret_size: i32| -> i32 {
                wasi_code(with_mem(&mut c, |mem, _| {
                    put_u32(mem, ret_count, 0)?;
                    put_u32(mem, ret_size, 0)
                }))
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        d.wrap(WASI, name, |_c: C<'_>, _a: i32, _b: i32| -> i32 {
            errno::SUCCESS
        })?;
    }
    d.wrap(WASI, "proc_exit", |_c: C<'_>, code: i32| -> HResult<()> {
        Err(ProcExit(code).into())
    })?;
    d.wrap(WASI, "sched_yield", |_c: C<'_>| -> i32 { errno::SUCCESS })?;
    // No preopened directories: wasi-libc stops scanning at BADF.
    d.wrap(
        WASI,
        "fd_prestat_get",
        |_c: C<'_>, _fd: i32, _ret: i32| -> i32 { errno::BADF },
    )?;
    d.wrap(
        WASI,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: i32, _p: i32, _l: i32| -> i32 { errno::BADF },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_cut_and_say_by_how_much() {
        assert_eq!(log_text(b"hello", 5), "hello");
        let long = vec![b'a'; MAX_LOG_LINE_BYTES + 10];
        let t = log_text(&long, long.len() as u64);
        assert!(t.ends_with("... [10 bytes cut]"), "{}", &t[t.len() - 30..]);
        // Only part of a line at hand (fd_write keeps what it logs).
        let t = log_text(b"abc", 1_000_003);
        assert_eq!(t, "abc... [1000000 bytes cut]");
    }

    #[test]
    fn guests_grow_maps_up_to_the_limit_or_what_they_were_given() {
        assert_eq!(check_map_growth(10, MAX_MAP_BYTES), Ok(()));
        assert_eq!(
            check_map_growth(10, MAX_MAP_BYTES + 1),
            Err(Status::InternalFailure)
        );
        // A map handed over larger than the limit may shrink or stay.
        let big = MAX_MAP_BYTES * 2;
        assert_eq!(check_map_growth(big, big), Ok(()));
        assert_eq!(check_map_growth(big, big + 1), Err(Status::InternalFailure));
    }
}
