#!/usr/bin/env bash
# The hardware-virtualization rig: run a payload inside an outer VM ("L1") whose
# stock Debian kernel loads kvm_amd on the AMD SVM + nested paging that QEMU's
# software emulator (TCG) provides, so the payload has a real hardware-style
# /dev/kvm even where the host's own /dev/kvm cannot boot Linux guests.
#
# Usage:
#   rig/run.sh --peer [OPTIONS]              QEMU (-M pc, -M microvm) boots the test guest
#                                            inside L1: start-to-marker, total time, exits
#   rig/run.sh --bhyve PATH [OPTIONS]        our static bhyve boots the test guest inside
#                                            L1: 1 and 2 vCPUs, quiet and not quiet, PVH,
#                                            the guest's dmesg, root file system on
#                                            virtio-blk, pings over virtio-net, hostile inputs
#   rig/run.sh --compare PATH [OPTIONS]      our bhyve and QEMU (-M pc, -M microvm) side by
#                                            side in one L1: start-to-marker, exits
#   rig/run.sh --payload DIR [OPTIONS]       any payload: DIR/run.sh runs in L1 (busybox sh)
#
# Options:
#   --runs N             timed runs per configuration (--peer, --compare; default 3)
#   --machines "LIST"    QEMU machine types for --peer (default "pc microvm"); for
#                        --compare the VMMs, in order (default "bhyve pc microvm";
#                        bhyve-pvh = ours booting the ELF vmlinux through PVH)
#   --cases "LIST"       --bhyve: which checks to run (default all: c1.quiet c1.verbose
#                        c2.quiet c2.verbose c1.reboot c1.pvh c1.rootfs c1.net hostile l1.dmesg)
#   --no-count-exits     --peer, --compare: skip the extra run that counts exits
#   --profile            --compare: two more runs per VMM: a timeline from L1's
#                        trace buffer, and initcall_debug with our exit trace
#   --variant NAME=PATH  --compare: another build of our bhyve, run as VMM NAME (list
#                        NAME in --machines); e.g. a prototype against the current one
#   --guest-append STR   append STR to the test guest's kernel command line
#                        (e.g. 'init=/nope rdinit=/nope' to see "marker-missing")
#   --guest-timeout S    limit for one guest run inside L1 (default 120; --bhyve,
#                        --compare 90)
#   --with-qemu          put the host's QEMU in L1 in every mode (--peer always does;
#                        rig/test/fake-bhyve.sh needs it)
#   --timeout S          limit for the whole outer VM (default: enough for every inner
#                        run to reach --guest-timeout, plus 180 s; --payload 1200)
#   --l1-smp N, --l1-mem SIZE, --l1-cpu MODEL, --l1-append STR, --l1-accel STR
#                        outer VM settings (default 2 (--bhyve: 1), 2G, max, "", tcg;
#                        --compare: --l1-append defaults to "init_on_free=1"; see rig/README.md)
#   --l1-qemu PATH|backports
#                        the emulator that runs the outer VM (default: qemu-system-x86_64 on
#                        PATH; a ../share/qemu beside PATH is passed as -L); "backports":
#                        Debian backports' QEMU, downloaded and extracted into the cache, not
#                        installed (rig/README.md, "The outer VM's emulator"). Inner QEMU peers
#                        are always the host's /usr/bin/qemu-system-x86_64
#   --stall S            stop the outer VM when its console is silent for S seconds (default:
#                        --guest-timeout + 100 for --peer/--bhyve/--compare, 0 = off for --payload)
#   --out DIR            where to write results (default .cache/rig/runs/DATE-MODE)
#   -v, --verbose        stream the outer VM's console to stderr while it runs
#
# Environment: BHYVE_RS_CACHE (cache root, default <repo>/.cache; the rig uses
# its rig/ and debs/ and pkg/ subfolders, and qemu-outer/ and apt-*-backports/ for
# --l1-qemu backports); RIG_L1_QEMU, RIG_L1_SMP (the defaults of --l1-qemu, --l1-smp).
#
# Output files in --out DIR: console.log (outer VM console), results.txt
# (KEY=VALUE, one per RIG-RESULT line, plus rig.* lines), consoles/NAME.log
# (each inner VM's console). The results also go to stdout.
#
# --bhyve with c1.rootfs also writes rootfs.img (the guest's ext4 root, L1's /dev/vda) to
# --out DIR and checks it after the outer VM stops (step rootfs-image).
#
# Exit status: the payload's (0 = all passed), or the rig's own:
#   2 usage, 10 host tools, 11 download, 12 initramfs build,
#   20 L1 did not boot to its init, 21 module load, 22 /dev/kvm missing,
#   23 guest marker missing, 24 guest timeout, 25 VMM exit status unexpected,
#   26 payload timeout (outer VM limit reached), 27 payload missing.
set -euo pipefail

RIG_PROG=rig/run.sh
export RIG_PROG
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$here/lib/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

mode=
payload_src=
bhyve_bin=
runs=3
machines=
count_exits=1
profile=0
variants=()
all_cases="c1.quiet c1.verbose c2.quiet c2.verbose c1.reboot c1.pvh c1.rootfs c1.net hostile l1.dmesg"
cases=$all_cases
guest_append=
guest_timeout=
with_qemu=0
outer_timeout=
l1_smp=${RIG_L1_SMP:-}
l1_mem=2G
l1_append=-
l1_cpu=max
l1_accel=tcg
l1_qemu=${RIG_L1_QEMU:-qemu-system-x86_64}
out=
stall=
verbose=0
need() { [[ $# -ge 2 && -n $2 ]] || rig_die "$RIG_EX_USAGE" usage "$1 needs a value (see --help)"; }
while (($#)); do
    case $1 in
        --peer) mode=peer; shift ;;
        --bhyve) need "$@"; mode=bhyve; bhyve_bin=$2; shift 2 ;;
        --compare) need "$@"; mode=compare; bhyve_bin=$2; shift 2 ;;
        --profile) profile=1; shift ;;
        --variant) need "$@"; variants+=("$2"); shift 2 ;;
        --cases) need "$@"; cases=$2; shift 2 ;;
        --payload) need "$@"; mode=payload; payload_src=$2; shift 2 ;;
        --runs) need "$@"; runs=$2; shift 2 ;;
        --machines) need "$@"; machines=$2; shift 2 ;;
        --no-count-exits) count_exits=0; shift ;;
        --with-qemu) with_qemu=1; shift ;;
        --guest-append) need "$@"; guest_append=$2; shift 2 ;;
        --guest-timeout) need "$@"; guest_timeout=$2; shift 2 ;;
        --timeout) need "$@"; outer_timeout=$2; shift 2 ;;
        --l1-smp) need "$@"; l1_smp=$2; shift 2 ;;
        --l1-mem) need "$@"; l1_mem=$2; shift 2 ;;
        --l1-append) need "$@"; l1_append=$2; shift 2 ;;
        --l1-cpu) need "$@"; l1_cpu=$2; shift 2 ;;
        --l1-accel) need "$@"; l1_accel=$2; shift 2 ;;
        --l1-qemu) need "$@"; l1_qemu=$2; shift 2 ;;
        --out) need "$@"; out=$2; shift 2 ;;
        --stall) need "$@"; stall=$2; shift 2 ;;
        -v | --verbose) verbose=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) rig_die "$RIG_EX_USAGE" usage "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $mode ]] || rig_die "$RIG_EX_USAGE" usage "say what to run: --peer, --bhyve PATH, --compare PATH or --payload DIR (see --help)"
[[ $mode == peer || $mode == compare ]] && with_qemu=1
if [[ $l1_append == - ]]; then
    # TCG keeps translated code keyed by L1-physical pages: an inner VM whose memory lands on
    # pages that held an earlier inner guest's kernel code pays for invalidating it (up to
    # ~0.5 s per 2 MiB fault). Zeroing pages when L1 frees them moves that cost out of the
    # next VM's boot, so every VMM in a side-by-side run starts from the same state.
    if [[ $mode == compare ]]; then l1_append=init_on_free=1; else l1_append=; fi
fi
if [[ -z $machines ]]; then
    if [[ $mode == compare ]]; then machines="bhyve pc microvm"; else machines="pc microvm"; fi
fi
for c in $cases; do
    [[ " $all_cases " == *" $c "* ]] ||
        rig_die "$RIG_EX_USAGE" usage "--cases: unknown case '$c' (see --help)"
done
variant_names=" "
for v in "${variants[@]}"; do
    [[ $mode == compare ]] || rig_die "$RIG_EX_USAGE" usage "--variant is for --compare"
    vname=${v%%=*} vpath=${v#*=}
    [[ $v == *=* && $vname =~ ^[a-z][a-z0-9_]*$ && $vname != bhyve ]] ||
        rig_die "$RIG_EX_USAGE" usage "--variant $v: want NAME=PATH, NAME in [a-z0-9_] (not bhyve)"
    [[ -f $vpath && -x $vpath ]] || rig_die "$RIG_EX_USAGE" usage "--variant $v: no such executable"
    variant_names+="$vname "
done
if [[ $mode == compare ]]; then
    for m in $machines; do
        [[ $m == bhyve || $m == bhyve-pvh || $m == pc || $m == microvm || $variant_names == *" $m "* ]] ||
            rig_die "$RIG_EX_USAGE" usage "--compare: --machines takes bhyve, bhyve-pvh, pc, microvm or a --variant NAME (not '$m')"
    done
fi
if [[ -z $guest_timeout ]]; then
    if [[ $mode == bhyve || $mode == compare ]]; then guest_timeout=90; else guest_timeout=120; fi
fi
# --bhyve's checks want a stable outer VM more than speed: QEMU's emulated SVM faulted (inner
# triple faults, L1 oopses) with two CPUs in L1 and never with one (rig/README.md, "The outer VM").
# The figures of --peer and --compare need the device-model thread on a CPU of its own.
if [[ -z $l1_smp ]]; then
    if [[ $mode == bhyve ]]; then l1_smp=1; else l1_smp=2; fi
fi
if [[ -z $outer_timeout ]]; then
    case $mode in
        peer) outer_timeout=$(($(wc -w <<<"$machines") * (runs + count_exits) * (guest_timeout + 10) + 180)) ;;
        bhyve) outer_timeout=$((8 * (guest_timeout + 10) + 4 * 40 + 180)) ;;
        compare) outer_timeout=$(($(wc -w <<<"$machines") * (1 + runs + count_exits + 2 * profile) * (guest_timeout + 10) + 180)) ;;
        *) outer_timeout=1200 ;;
    esac
fi
if [[ -z $stall ]]; then
    if [[ $mode == payload ]]; then stall=0; else stall=$((guest_timeout + 100)); fi
fi
[[ $stall =~ ^[0-9]+$ ]] || rig_die "$RIG_EX_USAGE" usage "--stall: '$stall' is not a number of seconds"
for n in "$runs" "$guest_timeout" "$outer_timeout" "$l1_smp"; do
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || rig_die "$RIG_EX_USAGE" usage "'$n' is not a positive number"
done
if [[ $mode == bhyve || $mode == compare ]]; then
    [[ -f $bhyve_bin && -x $bhyve_bin ]] || rig_die "$RIG_EX_USAGE" usage "--$mode $bhyve_bin: no such executable"
    bhyve_bin=$(cd "$(dirname "$bhyve_bin")" && pwd)/$(basename "$bhyve_bin")
    if command -v file >/dev/null && ! file -L "$bhyve_bin" | grep -q 'statically linked\|static-pie linked'; then
        rig_log "warning: $bhyve_bin does not look statically linked; L1 has no shared libraries for it"
    fi
fi
if [[ $mode == payload ]]; then
    [[ -f $payload_src/run.sh ]] || rig_die "$RIG_EX_USAGE" usage "--payload $payload_src: it has no run.sh"
fi

cache=$(rig_cache_root)
rc_dir=$cache/rig
mkdir -p "$rc_dir"
started=$(date +%s)

# --- (a) host tools ---------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cpio >/dev/null || missing+=(cpio)
command -v depmod >/dev/null || [[ -x /usr/sbin/depmod ]] || [[ -x /sbin/depmod ]] || missing+=(kmod)
# lz4: guest-linux/fetch.sh decompresses the ELF vmlinux (for PVH) out of the bzImage.
command -v lz4 >/dev/null || missing+=(lz4)
# e2fsprogs: the --bhyve rootfs case makes its ext4 image (mke2fs -d) and reads it back
# (e2fsck, debugfs).
rootfs=0
[[ $mode == bhyve && " $cases " == *" c1.rootfs "* ]] && rootfs=1
if [[ $rootfs == 1 ]]; then
    for t in mke2fs e2fsck debugfs; do
        command -v $t >/dev/null || [[ -x /usr/sbin/$t || -x /sbin/$t ]] || { missing+=(e2fsprogs); break; }
    done
fi
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || rig_die "$RIG_EX_HOST_TOOLS" host-tools "missing ${missing[*]}: run 'apt-get install ${missing[*]}' as root"
    rig_log "installing host tools: ${missing[*]}"
    rig_apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        rig_die "$RIG_EX_HOST_TOOLS" host-tools "apt-get install ${missing[*]} failed"
fi
PATH=$PATH:/usr/sbin:/sbin

# --- (b) L1 kernel, its kvm modules, busybox --------------------------------
l1_pkg=$(rig_deb_resolve_dep linux-image-amd64 linux-image-6)
l1_ver=$(rig_deb_candidate "$l1_pkg")
l1_dir=$(rig_deb_fetch "$l1_pkg")
bb_ver=$(rig_deb_candidate busybox-static)
bb_dir=$(rig_deb_fetch busybox-static)
kver=${l1_pkg#linux-image-}
l1_kernel=$l1_dir/boot/vmlinuz-$kver
[[ -f $l1_kernel ]] || rig_die "$RIG_EX_DOWNLOAD" download "$l1_pkg has no boot/vmlinuz-$kver"
moddir=$l1_dir/lib/modules/$kver
# Load order from modules.dep (every module after the ones it needs): kvm-amd; virtio-pci and
# virtio-blk for the disk the --bhyve rootfs case gives L1 (the inner guest's root file system);
# tun for the tap device of the virtio-net case.
order_list=$(rig_module_order "$moddir" kernel/arch/x86/kvm/kvm-amd.ko kernel/drivers/virtio/virtio_pci.ko \
    kernel/drivers/block/virtio_blk.ko kernel/drivers/net/tun.ko) || exit $?
mapfile -t order <<<"$order_list"

# --- (c) L1 base initramfs (cached) -----------------------------------------
l1_key=$({ printf '%s\n' "$l1_pkg=$l1_ver" "busybox-static=$bb_ver" "${order[@]}"; cat "$here/l1/init" "$here/l1/harness.sh" "$here/lib/common.sh"; } | rig_hash)
l1_cpio=$rc_dir/l1/$l1_key.cpio
if [[ ! -f $l1_cpio ]]; then
    rig_log "building the L1 initramfs ($l1_key)"
    stage=$rc_dir/stage-l1
    rm -rf "$stage"
    rig_busybox_root "$bb_dir" "$stage"
    mkdir -p "$stage/rig/modules" "$stage/payload" "$stage/sys/kernel/debug" "$stage/sys/kernel/tracing"
    for m in "${order[@]}"; do
        mkdir -p "$stage/rig/modules/$(dirname "$m")"
        cp "$moddir/$m" "$stage/rig/modules/$m"
    done
    printf '%s\n' "${order[@]}" >"$stage/rig/modules.order"
    install -m 0755 "$here/l1/init" "$stage/init"
    install -m 0644 "$here/l1/harness.sh" "$stage/rig/harness.sh"
    mkdir -p "$rc_dir/l1"
    rig_cpio_tree "$stage" "$l1_cpio.tree"
    rig_cpio_devnodes "$l1_cpio.dev"
    cat "$l1_cpio.tree" "$l1_cpio.dev" >"$l1_cpio.tmp"
    rm -rf "$stage" "$l1_cpio.tree" "$l1_cpio.dev"
    mv "$l1_cpio.tmp" "$l1_cpio"
fi
parts=("$l1_cpio")

# --- QEMU inside L1 (--peer, --with-qemu): the host's QEMU, libraries, firmware
qemu_ver=
if [[ $with_qemu == 1 ]]; then
    qbin=$(command -v qemu-system-x86_64)
    qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || qemu-system-x86_64 --version | head -n1)
    libs=$(ldd "$qbin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
    q_key=$({ printf '%s\n' "$qemu_ver" "$libs"; cat "$here/lib/common.sh"; } | rig_hash)
    q_cpio=$rc_dir/qemu/$q_key.cpio
    if [[ ! -f $q_cpio ]]; then
        rig_log "packing the host's QEMU $qemu_ver for L1 ($q_key)"
        stage=$rc_dir/stage-qemu
        rm -rf "$stage"
        mkdir -p "$stage/usr/bin" "$stage/usr/share"
        cp "$qbin" "$stage/usr/bin/qemu-system-x86_64"
        while read -r lib; do
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$lib" "$stage$lib"
        done <<<"$libs"
        for d in /usr/share/qemu /usr/share/seabios; do
            [[ -d $d ]] && cp -a "$d" "$stage/usr/share/"
        done
        mkdir -p "$rc_dir/qemu"
        rig_cpio_tree "$stage" "$q_cpio.tmp"
        rm -rf "$stage"
        mv "$q_cpio.tmp" "$q_cpio"
    fi
    parts+=("$q_cpio")
fi

# --- (d) the payload ----------------------------------------------------------
guest_pkg=
stage=$rc_dir/stage-payload
rm -rf "$stage"
mkdir -p "$stage/payload"
if [[ $mode == peer || $mode == bhyve || $mode == compare ]]; then
    # Only --bhyve and --compare with bhyve-pvh boot the ELF vmlinux (PVH): the others
    # leave its 50 MB out of L1.
    want_vmlinux=0
    [[ $mode == bhyve || ($mode == compare && " $machines " == *" bhyve-pvh "*) ]] && want_vmlinux=1
    if [[ $want_vmlinux == 1 ]]; then
        guest_env=$("$repo/guest-linux/fetch.sh") || exit $?
    else
        guest_env=$("$repo/guest-linux/fetch.sh" --no-vmlinux) || exit $?
    fi
    GUEST_KERNEL=$(sed -n 's/^GUEST_KERNEL=//p' <<<"$guest_env")
    GUEST_VMLINUX=$(sed -n 's/^GUEST_VMLINUX=//p' <<<"$guest_env")
    GUEST_INITRD=$(sed -n 's/^GUEST_INITRD=//p' <<<"$guest_env")
    GUEST_INITRD_VIRTIO=$(sed -n 's/^GUEST_INITRD_VIRTIO=//p' <<<"$guest_env")
    GUEST_ROOTFS_TREE=$(sed -n 's/^GUEST_ROOTFS_TREE=//p' <<<"$guest_env")
    guest_pkg=$(sed -n 's/^GUEST_KERNEL_PACKAGE=//p' <<<"$guest_env")
    mkdir -p "$stage/payload/guest"
    cp "$GUEST_KERNEL" "$stage/payload/guest/vmlinuz"
    cp "$GUEST_INITRD" "$stage/payload/guest/initramfs.cpio"
    if [[ $mode == bhyve && (" $cases " == *" c1.rootfs "* || " $cases " == *" c1.net "*) ]]; then
        cp "$GUEST_INITRD_VIRTIO" "$stage/payload/guest/initramfs-virtio.cpio"
    fi
    if [[ $want_vmlinux == 1 ]]; then
        [[ -f $GUEST_VMLINUX ]] || rig_die "$RIG_EX_BUILD" vmlinux "guest-linux/fetch.sh gave no ELF vmlinux"
        cp "$GUEST_VMLINUX" "$stage/payload/guest/vmlinux"
    fi
    cp "$here/payloads/$mode.sh" "$stage/payload/run.sh"
    if [[ $mode == bhyve || $mode == compare ]]; then cp "$bhyve_bin" "$stage/payload/bhyve"; fi
    for v in "${variants[@]}"; do cp "${v#*=}" "$stage/payload/bhyve-variant-${v%%=*}"; done
    {
        printf 'RIG_RUNS=%s\n' "$runs"
        printf 'RIG_MACHINES=%q\n' "$machines"
        printf 'RIG_COUNT_EXITS=%s\n' "$count_exits"
        printf 'RIG_PROFILE=%s\n' "$profile"
        printf 'RIG_CASES=%q\n' "$cases"
        printf "RIG_GUEST_APPEND='%s'\n" "${guest_append//\'/}"
        printf 'RIG_GUEST_TIMEOUT=%s\n' "$guest_timeout"
    } >"$stage/payload/rig.conf"
else
    cp -a "$payload_src/." "$stage/payload/"
fi
p_key=$( (cd "$stage" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; find . -printf '%p %m %l\n' | LC_ALL=C sort) | rig_hash)
p_cpio=$rc_dir/payload/$p_key.cpio
if [[ ! -f $p_cpio ]]; then
    mkdir -p "$rc_dir/payload"
    rig_cpio_tree "$stage" "$p_cpio.tmp"
    mv "$p_cpio.tmp" "$p_cpio"
fi
rm -rf "$stage"
parts+=("$p_cpio")

# One -initrd file: the archives back to back (the kernel unpacks them all).
i_key=$(printf '%s\n' "${parts[@]}" | rig_hash)
initrd=$rc_dir/initrd/$i_key.cpio
if [[ ! -f $initrd ]]; then
    mkdir -p "$rc_dir/initrd"
    cat "${parts[@]}" >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
fi
touch "${parts[@]}" "$initrd"
# Built archives are cheap to remake: keep the newest few of each kind.
prune() { # DIR KEEP
    [[ -d $1 ]] || return 0
    find "$1" -maxdepth 1 -name '*.cpio' -printf '%T@ %p\n' | sort -rn | tail -n +$(($2 + 1)) | cut -d' ' -f2- | xargs -r rm -f
}
prune "$rc_dir/initrd" 3
prune "$rc_dir/payload" 6
prune "$rc_dir/qemu" 2
prune "$rc_dir/l1" 3

# --- (e) run the outer VM ---------------------------------------------------
[[ -n $out ]] || out=$rc_dir/runs/$(date +%Y%m%d-%H%M%S)-$mode
mkdir -p "$out/consoles"
log=$out/console.log
results=$out/results.txt
# The inner guest's root file system (--bhyve, c1.rootfs): an ext4 image made here from
# guest-linux/fetch.sh's tree plus a seed file of random bytes the guest reads back; L1 gets
# it as its /dev/vda, our bhyve gives it to the guest, and it is checked here after L1 stops.
drive=()
rootfs_img=$out/rootfs.img
if [[ $rootfs == 1 ]]; then
    rstage=$out/.rootfs-tree
    rm -rf "$rstage" "$rootfs_img"
    cp -a "$GUEST_ROOTFS_TREE" "$rstage"
    mkdir -p "$rstage/bhyvers"
    head -c 196608 /dev/urandom >"$rstage/bhyvers/seed"
    seed_sha=$(sha256sum <"$rstage/bhyvers/seed" | cut -d' ' -f1)
    truncate -s 64M "$rootfs_img"
    mke2fs -q -F -t ext4 -L bhyvers-root -d "$rstage" "$rootfs_img" >&2 ||
        rig_die "$RIG_EX_BUILD" rootfs "mke2fs -t ext4 -d $rstage $rootfs_img failed"
    rm -rf "$rstage"
    drive=(-drive "file=$rootfs_img,format=raw,if=virtio")
fi
prep_s=$(($(date +%s) - started))
if [[ $l1_qemu == backports ]]; then
    l1_qemu=$(rig_backports_qemu) || exit
fi
l1_qemu_opts=()
l1_qemu_data=$(dirname "$(command -v "$l1_qemu" || echo "$l1_qemu")")/../share/qemu
[[ $l1_qemu == qemu-system-x86_64 || ! -d $l1_qemu_data ]] || l1_qemu_opts=(-L "$l1_qemu_data")
l1_qemu_version=$("$l1_qemu" --version 2>/dev/null | head -n 1) || l1_qemu_version=
[[ -n $l1_qemu_version ]] ||
    rig_die "$RIG_EX_HOST_TOOLS" host-tools "the outer VM's emulator '$l1_qemu' does not run"
rig_log "starting the outer VM ($l1_qemu_version, -accel $l1_accel, -cpu $l1_cpu, -smp $l1_smp, -m $l1_mem, limit ${outer_timeout}s); console: $log"
# L1's boot-time 8254 check busy-waits and once failed on a loaded host (L1 panics "IO-APIC +
# timer doesn't work", reported as l1-boot); no_timer_check would skip it, but it was in place
# during three of the four L1 hangs seen (rig/README.md), so the rig keeps the stock behaviour.
qemu_cmd=("$l1_qemu" "${l1_qemu_opts[@]}" -accel "$l1_accel" -cpu "$l1_cpu" -smp "$l1_smp" -m "$l1_mem"
    -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot
    -kernel "$l1_kernel" -initrd "$initrd" "${drive[@]}"
    -append "console=ttyS0 panic=-1 quiet${l1_append:+ $l1_append}")
t0=$(date +%s.%N)
set +e
timeout -k 10 "$outer_timeout" "${qemu_cmd[@]}" </dev/null >"$log" 2>&1 &
qpid=$!
tailpid=
if [[ $verbose == 1 ]]; then
    tail -n +1 -f "$log" >&2 &
    tailpid=$!
fi
# Stall watchdog: an L1 that prints nothing for --stall seconds is hung (seen once: TCG spinning
# in its nested-SVM code with the inner VM's limit long past, so nothing inside L1 could react).
stalled=0 still=0 last_size=-1
while kill -0 "$qpid" 2>/dev/null; do
    sleep 1
    ((stall > 0)) || continue
    size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    if [[ $size == "$last_size" ]]; then still=$((still + 1)); else still=0 last_size=$size; fi
    if ((still >= stall)); then
        stalled=1
        rig_log "the outer VM printed nothing for ${stall}s: stopping it"
        kill -TERM "$qpid" 2>/dev/null
        break
    fi
done
wait "$qpid"
qrc=$?
if [[ -n $tailpid ]]; then
    sleep 0.2
    kill "$tailpid" 2>/dev/null
    wait "$tailpid" 2>/dev/null
fi
set -e
t1=$(date +%s.%N)
outer_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')

# --- (f) results --------------------------------------------------------------
clean=$out/.console.txt
tr -d '\r' <"$log" >"$clean"
# Inner consoles, framed by RIG-CONSOLE-BEGIN/END NAME, lines prefixed "NAME| ".
awk -v dir="$out/consoles" '
    /^RIG-CONSOLE-BEGIN / { name = $2; f = dir "/" name ".log"; printf "" >f; next }
    /^RIG-CONSOLE-END / { close(f); name = ""; next }
    name != "" { p = name "| "; if (index($0, p) == 1) print substr($0, length(p) + 1) >>f }
' "$clean"
{
    sed -n 's/^RIG-RESULT //p' "$clean"
    printf 'rig.mode=%s\n' "$mode"
    printf 'rig.l1_kernel_package=%s\n' "$l1_pkg=$l1_ver"
    printf 'rig.busybox_package=%s\n' "busybox-static=$bb_ver"
    [[ -n $guest_pkg ]] && printf 'rig.guest_kernel_package=%s\n' "$guest_pkg"
    [[ -n $qemu_ver ]] && printf 'rig.qemu_package=%s\n' "qemu-system-x86=$qemu_ver"
    printf 'rig.l1_append=%s\n' "$l1_append"
    printf 'rig.l1_accel=%s\n' "$l1_accel"
    printf 'rig.l1_qemu=%s\n' "$l1_qemu_version"
    printf 'rig.prepare_s=%s\n' "$prep_s"
    printf 'rig.outer_vm_s=%s\n' "$outer_s"
} >"$results"

status=$(sed -n 's/^RIG-EXIT \([0-9]*\).*/\1/p' "$clean" | tail -n 1)
fails=$(grep '^RIG-FAIL ' "$clean" || true)
report_failure() { # STATUS STEP MESSAGE: say which step failed, show the console tail
    local st=$1 step=$2 msg=$3
    printf 'rig.failed_step=%s\nrig.exit_status=%s\n' "$step" "$st" >>"$results"
    cat "$results"
    printf '%s: FAILED step=%s: %s\n' "$RIG_PROG" "$step" "$msg" >&2
    printf '%s: last 40 lines of the outer VM console (%s):\n' "$RIG_PROG" "$log" >&2
    tail -n 40 "$clean" | awk '{ print "  | " $0 }' >&2
    exit "$st"
}
if [[ -z $status ]]; then
    if [[ $stalled == 1 ]]; then
        report_failure 20 l1-stall "the outer VM printed nothing for ${stall}s (--stall) and was stopped: L1 hung"
    elif [[ $qrc == 124 || $qrc == 137 ]]; then
        if grep -q '^RIG-STEP payload-start' "$clean"; then
            report_failure 26 payload-timeout "the payload did not finish within ${outer_timeout}s (--timeout)"
        elif grep -q '^RIG-STEP l1-init' "$clean"; then
            report_failure 20 l1-setup "L1 reached its init but stalled before the payload (timeout ${outer_timeout}s)"
        else
            report_failure 20 l1-boot "L1 did not reach its init within ${outer_timeout}s"
        fi
    elif ! grep -q '^RIG-STEP l1-init' "$clean"; then
        report_failure 20 l1-boot "the outer VM stopped (qemu status $qrc) before L1 reached its init"
    else
        report_failure 20 l1-crash "the outer VM stopped (qemu status $qrc) without a RIG-EXIT line"
    fi
fi
# The guest's root file system, checked on the host: replay the journal the guest left (it
# powered off after sync, without unmounting) on a copy, the file system must then be clean
# (e2fsck -fn), and hold the file with this run's nonce and the random bytes the guest
# reported; the guest must have read the seed file as the host wrote it.
rootfs_host_check() {
    local name=bhyve_c1.rootfs con nonce want got sum gsum seed copy rc
    con=$out/consoles/$name.log
    if [[ ! -f $con ]] || ! grep -q '^BHYVE-RS-WRITE ' "$con"; then
        printf '%s.host_image=not checked: the guest reported no write\n' "$name" >>"$results"
        return 0
    fi
    host_fail() { # STEP MESSAGE
        fails+=${fails:+$'\n'}"RIG-FAIL step=$1 $name: $2"
        [[ $status != 0 ]] || status=1
    }
    nonce=$(sed -n "s/^${name}[.]nonce=//p" "$results" | tail -n 1)
    copy=$out/.rootfs-replayed.img
    cp --sparse=always "$rootfs_img" "$copy"
    if dumpe2fs -h "$rootfs_img" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
        printf '%s.host_journal=needs recovery (mounted when the guest powered off): replayed on a copy\n' "$name" >>"$results"
    else
        printf '%s.host_journal=clean\n' "$name" >>"$results"
    fi
    rc=0
    e2fsck -E journal_only -y "$copy" >"$out/rootfs-e2fsck.log" 2>&1 || rc=$?
    if ((rc > 1)); then
        printf '%s.host_fsck=journal replay failed (e2fsck status %s)\n' "$name" "$rc" >>"$results"
        host_fail rootfs-image "e2fsck could not replay the journal of $rootfs_img (status $rc; $out/rootfs-e2fsck.log)"
        rm -f "$copy"
        return 0
    fi
    rc=0
    e2fsck -fn "$copy" >>"$out/rootfs-e2fsck.log" 2>&1 || rc=$?
    if ((rc == 0)); then
        printf '%s.host_fsck=clean\n' "$name" >>"$results"
    else
        printf '%s.host_fsck=errors (e2fsck -fn status %s)\n' "$name" "$rc" >>"$results"
        host_fail rootfs-image "e2fsck -fn finds errors in the guest's file system (status $rc; $out/rootfs-e2fsck.log)"
    fi
    want="BHYVE-RS-WRITTEN nonce=$nonce"
    got=$(debugfs -R 'cat /bhyvers/written.txt' "$copy" 2>/dev/null || true)
    if [[ $got == "$want" ]]; then
        printf '%s.host_written=ok: %s\n' "$name" "$got" >>"$results"
    else
        printf '%s.host_written=wrong: %s\n' "$name" "${got:-missing}" >>"$results"
        host_fail rootfs-image "/bhyvers/written.txt in $rootfs_img holds '${got:-nothing}', not '$want'"
    fi
    gsum=$(sed -n 's/^BHYVE-RS-WRITE .*random_sha256=\([0-9a-f]*\).*/\1/p' "$con" | head -n 1)
    sum=$({ debugfs -R 'cat /bhyvers/random.bin' "$copy" 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)
    if [[ -n $gsum && $sum == "$gsum" ]]; then
        printf '%s.host_random=ok: sha256 %s as the guest wrote it\n' "$name" "$sum" >>"$results"
    else
        printf '%s.host_random=wrong: sha256 %s, the guest wrote %s\n' "$name" "$sum" "${gsum:-?}" >>"$results"
        host_fail rootfs-image "/bhyvers/random.bin in $rootfs_img has sha256 $sum, the guest wrote ${gsum:-?}"
    fi
    seed=$(sed -n 's/^BHYVE-RS-SEED sha256=\([0-9a-f]*\).*/\1/p' "$con" | head -n 1)
    if [[ $seed == "$seed_sha" ]]; then
        printf '%s.host_seed=ok: the guest read the seed as written (sha256 %s)\n' "$name" "$seed" >>"$results"
    else
        printf '%s.host_seed=wrong: the guest read sha256 %s, the host wrote %s\n' "$name" "${seed:-?}" "$seed_sha" >>"$results"
        host_fail rootfs-read "the guest read /bhyvers/seed as sha256 ${seed:-?}, the host wrote $seed_sha"
    fi
    rm -f "$copy"
}
[[ $rootfs == 1 ]] && rootfs_host_check
printf 'rig.exit_status=%s\n' "$status" >>"$results"
if [[ $status != 0 ]]; then
    printf 'rig.failed_step=%s\n' "$(sed -n '1s/^RIG-FAIL step=\([^ ]*\).*/\1/p' <<<"$fails")" >>"$results"
    cat "$results"
    if [[ -n $fails ]]; then
        while read -r line; do
            step=${line#RIG-FAIL step=}
            step=${step%% *}
            msg=${line#RIG-FAIL step=* }
            printf '%s: FAILED step=%s: %s\n' "$RIG_PROG" "$step" "$msg" >&2
        done <<<"$fails"
        # The failing inner run's console says most: show its tail.
        first=$(sed -n '1s/^RIG-FAIL step=[^ ]* \([^:]*\):.*/\1/p' <<<"$fails")
        if [[ -n $first && -f $out/consoles/$first.log ]]; then
            printf '%s: last 40 lines of the console of %s (%s):\n' "$RIG_PROG" "$first" "$out/consoles/$first.log" >&2
            tail -n 40 "$out/consoles/$first.log" | awk '{ print "  | " $0 }' >&2
        else
            printf '%s: last 40 lines of the outer VM console (%s):\n' "$RIG_PROG" "$log" >&2
            tail -n 40 "$clean" | awk '{ print "  | " $0 }' >&2
        fi
    else
        printf '%s: FAILED step=payload: the payload exited with status %s\n' "$RIG_PROG" "$status" >&2
        tail -n 40 "$clean" | awk '{ print "  | " $0 }' >&2
    fi
    exit "$status"
fi
cat "$results"
rig_log "passed in ${outer_s}s (outer VM); results: $results"
