# shellcheck shell=bash
# Shared helpers for rig/run.sh and guest-linux/fetch.sh (sourced, never run).
#
# Everything here runs on the HOST (the machine that starts the outer VM, or a
# real hardware-virtualization host). Logs go to stderr; stdout is left to the
# calling script for its machine-readable output.

# shellcheck disable=SC2034 # used by the scripts that source this file
# Exit codes shared by the rig's host-side scripts (documented in rig/README.md).
readonly RIG_EX_USAGE=2 RIG_EX_HOST_TOOLS=10 RIG_EX_DOWNLOAD=11 RIG_EX_BUILD=12

rig_log() { printf '%s: %s\n' "${RIG_PROG:-rig}" "$*" >&2; }

# rig_die EXIT_CODE STEP MESSAGE...: report which step failed and stop.
rig_die() {
    local code=$1 step=$2
    shift 2
    printf '%s: FAILED step=%s: %s\n' "${RIG_PROG:-rig}" "$step" "$*" >&2
    exit "$code"
}

# Root of the repository this file lives in, and the cache root under it.
rig_repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }
rig_cache_root() { printf '%s\n' "${BHYVE_RS_CACHE:-$(rig_repo_root)/.cache}"; }

# Content hash of files and strings: used as cache keys.
rig_hash() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------
# Debian packages: resolve, download (no install), extract. All cached.
# ---------------------------------------------------------------------------

_rig_apt_updated=0
rig_apt_update_once() {
    [[ $_rig_apt_updated == 1 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        rig_die "$RIG_EX_DOWNLOAD" download "apt lists are missing or stale and 'apt-get update' needs root; run it once as root"
    fi
    rig_log "apt-get update"
    apt-get update -qq >&2 || rig_die "$RIG_EX_DOWNLOAD" download "apt-get update failed"
    _rig_apt_updated=1
}

# apt-cache answers are remembered until the package lists change (each
# apt-cache call costs about half a second).
_rig_apt_memo() { # NAME: the memo file for NAME under the current package lists
    local stamp
    stamp=$(stat -c %Y /var/lib/apt/lists /var/cache/apt/pkgcache.bin 2>/dev/null | tr '\n' -)
    printf '%s/apt-memo/%s/%s\n' "$(rig_cache_root)" "$stamp" "$1"
}

# rig_deb_candidate PKG: print the candidate version apt would download.
rig_deb_candidate() {
    local pkg=$1 ver memo
    memo=$(_rig_apt_memo "$pkg.candidate")
    if [[ -s $memo ]]; then
        cat "$memo"
        return 0
    fi
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    if [[ -z $ver || $ver == "(none)" ]]; then
        rig_apt_update_once
        ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    fi
    [[ -n $ver && $ver != "(none)" ]] || rig_die "$RIG_EX_DOWNLOAD" download "no Debian package named '$pkg' (apt-cache policy has no candidate)"
    memo=$(_rig_apt_memo "$pkg.candidate")
    mkdir -p "$(dirname "$memo")"
    printf '%s\n' "$ver" >"$memo"
    printf '%s\n' "$ver"
}

# rig_deb_resolve_dep METAPKG PREFIX: the concrete package a metapackage depends
# on, e.g. linux-image-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64.
rig_deb_resolve_dep() {
    local meta=$1 prefix=$2 dep memo
    rig_deb_candidate "$meta" >/dev/null
    memo=$(_rig_apt_memo "$meta.dep.$prefix")
    if [[ -s $memo ]]; then
        cat "$memo"
        return 0
    fi
    dep=$(apt-cache depends "$meta" 2>/dev/null | awk -v p="$prefix" '$1 == "Depends:" && index($2, p) == 1 {print $2; exit}')
    [[ -n $dep ]] || rig_die "$RIG_EX_DOWNLOAD" download "cannot resolve which '$prefix*' package '$meta' depends on"
    printf '%s\n' "$dep" >"$memo"
    printf '%s\n' "$dep"
}

# rig_deb_fetch PKG: download PKG's candidate .deb into the cache (once) and
# extract it (once). Prints the extraction directory, named PKG_VERSION.
rig_deb_fetch() {
    local pkg=$1 ver cache debs dir deb
    cache=$(rig_cache_root)
    debs=$cache/debs
    ver=$(rig_deb_candidate "$pkg")
    dir=$cache/pkg/${pkg}_${ver//:/%3a}
    if [[ -f $dir/.extracted ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    mkdir -p "$debs"
    deb=$(compgen -G "$debs/${pkg}_${ver//:/%3a}_*.deb" | head -n1 || true)
    if [[ -z $deb ]]; then
        rig_log "downloading $pkg $ver"
        (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) ||
            rig_die "$RIG_EX_DOWNLOAD" download "apt-get download $pkg=$ver failed"
        deb=$(compgen -G "$debs/${pkg}_${ver//:/%3a}_*.deb" | head -n1 || true)
        [[ -n $deb ]] || rig_die "$RIG_EX_DOWNLOAD" download "apt-get download $pkg=$ver left no .deb in $debs"
    fi
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    dpkg-deb -x "$deb" "$dir.tmp" || rig_die "$RIG_EX_DOWNLOAD" download "dpkg-deb -x $deb failed"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    touch "$dir/.extracted"
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------------------
# cpio "newc" archives. GNU cpio packs directory trees; the few device nodes
# an initramfs wants are written directly (the format is ASCII hex headers),
# so no root and no mknod are needed.
# ---------------------------------------------------------------------------

# rig_cpio_tree DIR OUT: pack DIR's contents (owned by root, fixed mtimes).
rig_cpio_tree() {
    local dir=$1 out=$2
    (cd "$dir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$out" ||
        rig_die "$RIG_EX_BUILD" initramfs "cpio failed packing $dir"
}

_rig_cpio_entry() { # name mode major minor  (no data)
    local name=$1 mode=$2 maj=$3 min=$4 namesize pad
    namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        0 "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0 "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# rig_cpio_devnodes OUT: dev/, dev/console, dev/null, dev/kvm as a cpio archive.
rig_cpio_devnodes() {
    local out=$1
    {
        _rig_cpio_entry dev $((8#040755)) 0 0
        _rig_cpio_entry dev/console $((8#020600)) 5 1
        _rig_cpio_entry dev/null $((8#020666)) 1 3
        _rig_cpio_entry dev/kvm $((8#020660)) 10 232
        _rig_cpio_entry 'TRAILER!!!' 0 0 0
    } >"$out"
}

# rig_busybox_root BUSYBOX_PKG_DIR ROOT: a static busybox at ROOT/bin/busybox
# with its applet links (made here rather than by 'busybox --install' at boot,
# so a guest reaches its init's first line sooner).
rig_busybox_root() {
    local bdir=$1 root=$2 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc}
    cp "$bdir/bin/busybox" "$root/bin/busybox"
    while read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done < <("$bdir/bin/busybox" --list-full) ||
        rig_die "$RIG_EX_BUILD" initramfs "cannot list busybox applets"
}

# ---------------------------------------------------------------------------
# Kernel modules.
# ---------------------------------------------------------------------------

# rig_module_order MODDIR MODULE...: the load order of MODULEs (paths as modules.dep names
# them, e.g. kernel/drivers/block/virtio_blk.ko) and everything they need, from
# MODDIR/modules.dep: each module after the ones it depends on, each once. Runs
# "depmod -b" on the extracted package first if it has no modules.dep yet.
rig_module_order() {
    local moddir=$1 base kver
    shift
    if [[ ! -f $moddir/modules.dep ]]; then
        kver=$(basename "$moddir")
        base=$(cd "$moddir/../../.." && pwd)
        rig_log "depmod for $kver"
        depmod -b "$base" "$kver" >&2 || rig_die "$RIG_EX_BUILD" modules "depmod -b $base $kver failed"
    fi
    local -A _seen=()
    local _order=()
    _rig_module_add() {
        local m=$1 d deps
        [[ -n ${_seen[$m]:-} ]] && return 0
        _seen[$m]=1
        grep -q "^$m:" "$moddir/modules.dep" || rig_die "$RIG_EX_BUILD" modules "$m is not in $moddir/modules.dep"
        read -ra deps < <(awk -v m="$m" -F': *' '$1 == m {print $2; exit}' "$moddir/modules.dep")
        for d in "${deps[@]}"; do _rig_module_add "$d"; done
        _order+=("$m")
    }
    local m
    for m in "$@"; do _rig_module_add "$m"; done
    printf '%s\n' "${_order[@]}"
}

# ---------------------------------------------------------------------------
# Kernel images.
# ---------------------------------------------------------------------------

_rig_bytes() { # FILE OFFSET LENGTH: print that byte range
    dd if="$1" bs=64K iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none
}

# rig_extract_vmlinux BZIMAGE OUT: decompress the ELF vmlinux held inside a
# bzImage. The boot protocol header (2.08+) says where the compressed payload
# sits (setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c); its magic
# says which decompressor to use; the kernel build appends the uncompressed size
# as 4 trailing bytes, which are cut off before decompressing.
rig_extract_vmlinux() {
    local bz=$1 out=$2 setup_sects poff plen start magic tool
    [[ $(od -An -tx1 -j $((0x202)) -N4 "$bz" | tr -d ' \n') == 48647253 ]] ||
        rig_die "$RIG_EX_BUILD" vmlinux "$bz is not a bzImage (no HdrS signature)"
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    [[ $setup_sects == 0 ]] && setup_sects=4
    read -r poff plen < <(od -An -tu4 -j $((0x248)) -N8 "$bz")
    start=$(((setup_sects + 1) * 512 + poff))
    magic=$(_rig_bytes "$bz" "$start" 6 | od -An -tx1 | tr -d ' \n')
    case $magic in
        1f8b*) tool="gzip -dc" ;;
        fd377a585a00) tool="xz -dc" ;;
        425a68*) tool="bzip2 -dc" ;;
        5d0000*) tool="xz --format=lzma -dc" ;;
        894c5a*) tool="lzop -dc" ;;
        02214c18*) tool="lz4 -dc" ;;
        28b52ffd*) tool="zstd -dc" ;;
        *) rig_die "$RIG_EX_BUILD" vmlinux "unknown compression magic $magic in $bz" ;;
    esac
    command -v "${tool%% *}" >/dev/null ||
        rig_die "$RIG_EX_BUILD" vmlinux "${tool%% *} is needed to decompress $bz (apt-get install it)"
    # shellcheck disable=SC2086 # $tool is a command with options
    _rig_bytes "$bz" "$start" $((plen - 4)) | $tool >"$out.tmp" ||
        rig_die "$RIG_EX_BUILD" vmlinux "$tool failed on the payload of $bz"
    [[ $(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] ||
        rig_die "$RIG_EX_BUILD" vmlinux "payload of $bz did not decompress to an ELF file"
    mv "$out.tmp" "$out"
}

# ---------------------------------------------------------------------------
# The outer VM's emulator from Debian backports (rig/README.md, "The outer VM's emulator").
# ---------------------------------------------------------------------------

# rig_backports_qemu: download qemu-system-x86 and the two packages it needs beside it
# (qemu-system-common, qemu-system-data) from <codename>-backports through a private apt
# state under the cache (the host's apt sources and installed packages are not touched),
# extract them once, and print the path of the extracted qemu-system-x86_64. Its shared
# libraries are the host's (the same ones the host's own qemu-system-x86 pulls in); a missing
# one is named.
rig_backports_qemu() {
    local cache codename suite apt_dir ver dir bin p deb missing
    local -a apt_opts
    cache=$(rig_cache_root)
    codename=$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || rig_die "$RIG_EX_DOWNLOAD" backports-qemu "no VERSION_CODENAME in /etc/os-release: which backports suite to use is unknown"
    suite=$codename-backports
    apt_dir=$cache/apt-$suite
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian %s main\n' \
        "$suite" >"$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives"
        -o APT::Sandbox::User=root)
    # The lists are refreshed once a day: backports move, and an old list names .debs the
    # mirror no longer has.
    if [[ -z $(find "$apt_dir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n 1) ]]; then
        rig_log "apt-get update ($suite, private lists in $apt_dir)"
        apt-get -qq "${apt_opts[@]}" update >&2 ||
            rig_die "$RIG_EX_DOWNLOAD" backports-qemu "apt-get update of $suite failed"
    fi
    # madison lists what the (private) sources offer, not what dpkg has installed.
    ver=$(apt-cache "${apt_opts[@]}" madison qemu-system-x86 2>/dev/null | awk -F' *[|] *' 'NR == 1 { print $2 }')
    [[ -n $ver ]] || rig_die "$RIG_EX_DOWNLOAD" backports-qemu "$suite has no qemu-system-x86"
    dir=$cache/qemu-outer/qemu_${ver//:/%3a}
    bin=$dir/usr/bin/qemu-system-x86_64
    if [[ ! -f $dir/.extracted ]]; then
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        for p in qemu-system-x86 qemu-system-common qemu-system-data; do
            deb=$(compgen -G "$apt_dir/debs/${p}_${ver//:/%3a}_*.deb" | head -n 1 || true)
            if [[ -z $deb ]]; then
                rig_log "downloading $p $ver ($suite)"
                (cd "$apt_dir/debs" && apt-get download -q "${apt_opts[@]}" "$p=$ver" >&2) ||
                    rig_die "$RIG_EX_DOWNLOAD" backports-qemu "apt-get download $p=$ver ($suite) failed"
                deb=$(compgen -G "$apt_dir/debs/${p}_${ver//:/%3a}_*.deb" | head -n 1 || true)
                [[ -n $deb ]] || rig_die "$RIG_EX_DOWNLOAD" backports-qemu "apt-get download $p=$ver left no .deb in $apt_dir/debs"
            fi
            dpkg-deb -x "$deb" "$dir.tmp" || rig_die "$RIG_EX_DOWNLOAD" backports-qemu "dpkg-deb -x $deb failed"
        done
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
        touch "$dir/.extracted"
    fi
    [[ -x $bin ]] || rig_die "$RIG_EX_DOWNLOAD" backports-qemu "$bin is missing from the extracted packages"
    missing=$(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' ')
    [[ -z $missing ]] || rig_die "$RIG_EX_HOST_TOOLS" backports-qemu "$bin needs shared libraries this host lacks: $missing(install the host's qemu-system-x86, which pulls them in)"
    printf '%s\n' "$bin"
}
