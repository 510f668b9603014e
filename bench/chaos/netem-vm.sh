#!/usr/bin/env bash
# Scenario 4 (netem) with the kernel's own `tc netem`, on a kernel that has
# sch_netem: Debian bookworm's, booted under QEMU (KVM where the CPU has
# it, else software emulation) with this machine's root file system shared
# read-only over 9p, under a tmpfs overlay. The VM runs the same meridian-chaos binary as
# `bench/chaos/run.sh netem`, with `--link netem`, so the link between the
# edge's and the origin's namespaces is a veth pair with netem on both ends.
#
#   bash bench/chaos/netem-vm.sh [--phase 15] [--burst 500]
#
# It builds as the calling user, then runs the rest as root (through sudo
# when it is not): apt installs what is missing (qemu-system-x86,
# busybox-static, kmod, cpio), and the kernel package comes from Debian's
# archive (`apt-get download`) into $CARGO_TARGET_DIR/netem-vm (else
# ./target/netem-vm). KVM is used where the CPU has it (vmx or svm) and a
# guest boots with it; elsewhere QEMU emulates the CPU, and the scenario's
# 15 s phases still fit (about 2 minutes for the release build).
# NETEM_VM_ACCEL=kvm or tcg overrides the choice.
# PROFILE=release (default) or debug, as for run.sh. The scenario's line and
# exit status are the VM's; the edge's logs land in $MERIDIAN_CHAOS_LOGS
# (default /tmp/meridian-chaos-logs/), as for run.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PROFILE="${PROFILE:-release}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
if [ -z "${NETEM_VM_BUILT:-}" ]; then
  flag=""; [ "$PROFILE" = release ] && flag="--release"
  cargo build $flag -p meridian-edge -p meridian-dns --bins >&2
  cargo build $flag -p meridian-e2e --bin meridian-chaos >&2
fi
if [ "$(id -u)" != 0 ]; then
  echo "netem-vm: the VM needs root (apt, namespaces inside it): running through sudo" >&2
  exec sudo env NETEM_VM_BUILT=1 PROFILE="$PROFILE" ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR="$CARGO_TARGET_DIR"} \
    ${MERIDIAN_CHAOS_LOGS:+MERIDIAN_CHAOS_LOGS="$MERIDIAN_CHAOS_LOGS"} \
    ${NETEM_VM_ACCEL:+NETEM_VM_ACCEL="$NETEM_VM_ACCEL"} bash "$0" "$@"
fi
# The VM's kernel: bookworm's, which builds sch_netem as a module.
KPKG="${NETEM_VM_KERNEL:-linux-image-amd64}"
VM_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/netem-vm"
LOGS="${MERIDIAN_CHAOS_LOGS:-/tmp/meridian-chaos-logs}"
TIMEOUT="${NETEM_VM_TIMEOUT:-1200}"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# busybox-static's binary, not a dynamic busybox: the initramfs has no libc.
static_busybox() { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }
static_busybox || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  echo "netem-vm: installing ${need[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
static_busybox || { echo "netem-vm: /bin/busybox is not static (busybox-static)" >&2; exit 1; }

# The kernel and its modules, unpacked once.
mkdir -p "$VM_DIR"
if [ ! -f "$VM_DIR/kernel.ok" ]; then
  rm -rf "$VM_DIR/deb" "$VM_DIR/root"; mkdir -p "$VM_DIR/deb" "$VM_DIR/root"
  ( cd "$VM_DIR/deb"
    apt-get update -q >&2 || true
    # linux-image-amd64 is a meta package: fetch what it depends on.
    img=$(apt-cache depends "$KPKG" | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
    [ -n "$img" ] || img="$KPKG"
    apt-get download "$img" >&2 )
  dpkg-deb -x "$VM_DIR"/deb/linux-image-*.deb "$VM_DIR/root"
  touch "$VM_DIR/kernel.ok"
fi
KVER=$(ls "$VM_DIR/root/lib/modules" | head -1)
VMLINUZ="$VM_DIR/root/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || { echo "netem-vm: no kernel in $VM_DIR/root/boot" >&2; exit 1; }
depmod -b "$VM_DIR/root" "$KVER"

# The initramfs: a static busybox, the modules that 9p, overlayfs, netem
# and veth need (in dependency order), and an init that mounts this
# machine's root read-only under a tmpfs overlay, runs the scenario in it
# and powers off.
IRD="$VM_DIR/initramfs"
rm -rf "$IRD"; mkdir -p "$IRD"/{bin,mod,proc,sys,dev,host}
cp /bin/busybox "$IRD/bin/busybox"
mods=()
for m in virtio_pci 9pnet_virtio 9p overlay sch_netem veth; do
  while read -r _ path; do
    b=$(basename "$path")
    cp -n "$path" "$IRD/mod/$b"
    case " ${mods[*]-} " in *" $b "*) ;; *) mods+=("$b") ;; esac
  done < <(modprobe -d "$VM_DIR/root" -S "$KVER" --show-depends "$m" | grep '^insmod ')
done
cat > "$IRD/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${mods[*]}; do insmod /mod/\$m || echo "netem-vm: insmod \$m failed"; done
# This machine's root, read-only, under a tmpfs overlay: every path is
# there (the checkout may be under /tmp), and what the run writes stays in
# the VM's memory.
mkdir -p /lower /rw
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower || { echo "netem-vm: no 9p root"; poweroff -f; }
mount -t tmpfs rw /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /host || { echo "netem-vm: no overlay root"; poweroff -f; }
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
mount -t tmpfs run /host/run
mkdir -p /host/run/out /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts; mount -t tmpfs shm /host/dev/shm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /host/run/out || { echo "netem-vm: no 9p out"; poweroff -f; }
ip link set lo up
echo "netem-vm: kernel \$(uname -r), running the netem scenario"
chroot /host /bin/sh -c 'cd "\$0" && "\$@" > /run/out/scenario.log 2>&1; echo \$? > /run/out/rc' \
  "$ROOT" /usr/bin/env MERIDIAN_EDGE_BIN="$BIN/meridian-edge" MERIDIAN_DNS_BIN="$BIN/meridian-dns" \
  MERIDIAN_CHAOS_LOGS=/run/out/logs HOME=/tmp PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  "$BIN/meridian-chaos" netem --link netem $(printf '%q ' "$@")
sync
poweroff -f
INIT
chmod +x "$IRD/init"
( cd "$IRD" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$VM_DIR/initramfs.gz"

OUT=$(mktemp -d /tmp/netem-vm.XXXXXX)
QPID=""
trap '[ -n "$QPID" ] && kill -9 "$QPID" 2>/dev/null; rm -rf "$OUT"' EXIT
# boot ACCEL CPU: starts the VM in the background (its console goes to
# $OUT/console.log and to stderr) and waits until its init says it runs the
# scenario; fails if that takes over $BOOT_S s, or the VM ends first.
BOOT_S="${NETEM_VM_BOOT_SECONDS:-120}"
boot() {
  : > "$OUT/console.log"
  qemu-system-x86_64 -accel "$1" -cpu "$2" -smp "$(nproc)" -m 3072 \
    -kernel "$VMLINUZ" -initrd "$VM_DIR/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$OUT,mount_tag=out,security_model=none" \
    -display none -monitor none -serial "file:$OUT/console.log" -no-reboot < /dev/null &
  QPID=$!
  local waited=0
  until grep -q 'netem-vm: kernel' "$OUT/console.log"; do
    if ! kill -0 "$QPID" 2>/dev/null || [ "$waited" -ge $((BOOT_S * 2)) ]; then
      kill -9 "$QPID" 2>/dev/null; wait "$QPID" 2>/dev/null || true; QPID=""
      return 1
    fi
    sleep 0.5; waited=$((waited + 1))
  done
}
# KVM where the CPU shows it (vmx or svm) and a guest boots with it; a
# sandbox can have a /dev/kvm whose guests hang at boot. Else QEMU's own
# CPU emulation (TCG).
ACCEL="${NETEM_VM_ACCEL:-auto}"
booted=""
if [ "$ACCEL" = kvm ] || { [ "$ACCEL" = auto ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; }; then
  if boot kvm host; then booted=kvm; else
    echo "netem-vm: a KVM guest did not boot in ${BOOT_S} s" >&2
    [ "$ACCEL" = kvm ] && { cat "$OUT/console.log" >&2; exit 1; }
  fi
fi
if [ -z "$booted" ]; then
  echo "netem-vm: software emulation (TCG), several times slower than KVM" >&2
  boot tcg,thread=multi max || {
    echo "netem-vm: the VM did not boot in ${BOOT_S} s:" >&2; cat "$OUT/console.log" >&2; exit 1; }
  booted=tcg
fi
# The whole run is bounded: past $TIMEOUT s the VM is killed.
elapsed=0
while kill -0 "$QPID" 2>/dev/null; do
  if [ "$elapsed" -ge "$TIMEOUT" ]; then
    echo "netem-vm: the VM ran past ${TIMEOUT} s: killed" >&2
    kill -9 "$QPID" 2>/dev/null || true
    break
  fi
  sleep 1; elapsed=$((elapsed + 1))
done
status=0
wait "$QPID" || status=$?
QPID=""
grep -v '^\s*$' "$OUT/console.log" >&2 || true
cat "$OUT/scenario.log" 2>/dev/null || true
mkdir -p "$LOGS"; cp -r "$OUT"/logs/. "$LOGS"/ 2>/dev/null || true
if [ ! -f "$OUT/rc" ]; then
  echo "netem-vm: the VM ($booted) ended (qemu status $status) without the scenario's exit status" >&2
  exit 1
fi
exit "$(cat "$OUT/rc")"
