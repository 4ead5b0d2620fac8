#!/bin/bash
# Build phyllome-tiny, the small real guest of the tests and the demo, into OUTDIR:
#   vmlinuz        Debian's signed cloud kernel (direct kernel boot)
#   initrd.gz      busybox-static initramfs whose /init prints PHYLLOME-TINY markers
#   disk.raw       sparse RAW GPT disk: ESP with signed shim -> signed GRUB -> the same
#                  kernel + initramfs; boots under OVMF with Secure Boot
#   manifest.json  sha256 and size of each file, kernel version, Debian package versions
#
# Usage: deploy/images/build-tiny.sh [--arch x86_64|aarch64] OUTDIR
#
# --arch aarch64 builds the same guest from Debian's arm64 packages (shimaa64, grubaa64, the
# signed cloud-arm64 kernel; serial console ttyAMA0, the PL011 of QEMU's virt machine), for
# AAVMF Secure Boot. Its apt state (package lists of that architecture, read with the host's
# sources) is private to the build, in $PHYLLOME_TINY_DEBS/apt-arm64 (or a temporary
# directory): the host's dpkg architectures stay as they are. Its /init also prints
# `arch=aarch64` and its manifest.json names the arch (absent: x86_64).
#
# Needs no root mount and installs nothing: the Debian packages are fetched with
# `apt-get download` (into $PHYLLOME_TINY_DEBS when set, which makes later builds offline)
# and unpacked with `dpkg-deb -x`. Host tools: apt, dpkg, kmod (depmod, modprobe), cpio,
# gzip, gdisk (sgdisk), dosfstools (mkfs.vfat), mtools. Same packages and inputs give the
# same bytes (fixed GUIDs, volume id and timestamps).
set -euo pipefail

arch=x86_64
if [ "${1:-}" = --arch ] && [ $# -ge 2 ]; then
    arch=$2
    shift 2
fi
if [ $# -ne 1 ]; then
    echo "usage: $0 [--arch x86_64|aarch64] OUTDIR" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
case "$arch" in
    x86_64) debarch=amd64 efiarch=x64 grubdir=x86_64-efi-signed console=ttyS0 extra_modules= ;;
    # The arm64 cloud kernel has the TPM's TIS driver as a module (CRB is built in).
    aarch64) debarch=arm64 efiarch=aa64 grubdir=arm64-efi-signed console=ttyAMA0
        extra_modules=tpm_tis ;;
    *)
        echo "build-tiny: arch '$arch' is not one of x86_64, aarch64" >&2
        exit 2
        ;;
esac
epoch=${SOURCE_DATE_EPOCH:-1700000000}
disk_mib=96
esp_mib=64
# Drivers the guest loads itself (the cloud kernel has TPM CRB/TIS and the 8250 UART built
# in, virtio and the rest as modules); modprobe adds their dependencies.
modules="virtio_pci virtio_blk virtio_net virtio_console virtio_rng virtio_balloon
         virtio_input virtiofs efivarfs button evdev${extra_modules:+ $extra_modules}"

for tool in apt-get apt-cache dpkg-deb depmod modprobe cpio gzip sgdisk mkfs.vfat mmd mcopy \
    sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "build-tiny: '$tool' not found; install: apt-get install kmod cpio gdisk" \
            "dosfstools mtools" >&2
        exit 1
    }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debs=${PHYLLOME_TINY_DEBS:-$work/debs}
mkdir -p "$debs" "$out"
debs=$(cd "$debs" && pwd)

# apt for the guest's architecture: the host's own for x86_64; for another one, private
# package lists of that architecture (updated here; kept when the update fails offline).
apt_opts=()
if [ "$debarch" != amd64 ]; then
    state=$debs/apt-$debarch
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    apt_opts=(-o "APT::Architecture=$debarch" -o "APT::Architectures=$debarch"
        -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
        -o "Dir::State::status=/dev/null" -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq >&2 || [ -n "$(ls "$state/lists" 2>/dev/null |
        grep -v -e '^partial$' -e '^lock$')" ] || {
        echo "build-tiny: 'apt-get update' for $debarch failed and no package lists" \
            "are cached in $state/lists" >&2
        exit 1
    }
fi

# fetch PACKAGE: print the path of the .deb of apt's candidate version, downloading it
# into $debs unless it is there already.
fetch() {
    local pkg=$1 version pkgarch file
    version=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$pkg" 2>/dev/null |
        sed -n 's/^Version: //p')
    pkgarch=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$pkg" 2>/dev/null |
        sed -n 's/^Architecture: //p')
    if [ -z "$version" ]; then
        echo "build-tiny: apt knows no package '$pkg'; run 'apt-get update' (Debian 12)" >&2
        exit 1
    fi
    file="$debs/${pkg}_${version//:/%3a}_${pkgarch}.deb"
    if [ ! -s "$file" ]; then
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${apt_opts[@]}" \
            "$pkg=$version" >&2) || {
            echo "build-tiny: 'apt-get download $pkg=$version' failed" >&2
            exit 1
        }
    fi
    echo "$pkg $version $file"
}

kernel_pkg=$(apt-cache "${apt_opts[@]}" depends "linux-image-cloud-$debarch" 2>/dev/null |
    awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
    echo "build-tiny: cannot resolve linux-image-cloud-$debarch; run 'apt-get update'" >&2
    exit 1
fi

root=$work/root
: >"$work/packages"
for pkg in "$kernel_pkg" busybox-static shim-signed "shim-helpers-$debarch-signed" \
    "grub-efi-$debarch-signed"; do
    read -r name version file < <(fetch "$pkg")
    dpkg-deb -x "$file" "$root"
    echo "$name $version" >>"$work/packages"
done

vmlinuz=$(ls "$root"/boot/vmlinuz-*)
kver=${vmlinuz##*/vmlinuz-}

# --- initramfs -------------------------------------------------------------------------
tree=$work/initramfs
mkdir -p "$tree"/{bin,dev,proc,sys,tmp,run,var/log,etc/acpi/PWRF} "$tree/lib/modules/$kver"
cp "$root/bin/busybox" "$tree/bin/busybox"
lister=$tree/bin/busybox
if [ "$debarch" != amd64 ]; then
    # The guest's busybox does not run here: its applets are those of the host's build of
    # the same package (same configuration).
    guest_apt=("${apt_opts[@]}")
    apt_opts=()
    read -r _ _ file < <(fetch busybox-static)
    apt_opts=("${guest_apt[@]}")
    dpkg-deb -x "$file" "$work/host"
    lister=$work/host/bin/busybox
fi
for applet in $("$lister" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
done
[ -L "$tree/bin/sh" ] || { echo "build-tiny: '$lister --list' gave no applets" >&2; exit 1; }
if [ "$arch" = x86_64 ]; then
    install -m 755 "$here/tiny/init" "$tree/init"
else
    # The same /init, which also says the guest's arch after its kernel (the x86_64 image
    # stays byte for byte what it was).
    sed '/^marker "kernel=\$kver"$/a marker "arch=$(uname -m)"' "$here/tiny/init" >"$tree/init"
    grep -qxF 'marker "arch=$(uname -m)"' "$tree/init" || {
        echo "build-tiny: tiny/init has no 'marker \"kernel=\$kver\"' line to follow" >&2
        exit 1
    }
    chmod 755 "$tree/init"
fi
install -m 755 "$here/tiny/power-button" "$tree/etc/acpi/PWRF/00000080"

depmod -b "$root" "$kver"
moddir=$root/lib/modules/$kver
: >"$tree/etc/modules.load"
for module in $modules; do
    modprobe -d "$root" -S "$kver" --show-depends "$module" | awk '$1 == "insmod" {print $2}'
done | while read -r path; do
    rel=${path#"$moddir"/}
    grep -qxF "$rel" "$tree/etc/modules.load" && continue
    mkdir -p "$(dirname "$tree/lib/modules/$kver/$rel")"
    cp "$path" "$tree/lib/modules/$kver/$rel"
    echo "$rel" >>"$tree/etc/modules.load"
done

find "$tree" -exec touch -h -d "@$epoch" {} +
(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$work/initrd.gz"
cp "$vmlinuz" "$work/vmlinuz"
touch -d "@$epoch" "$work/vmlinuz" "$work/initrd.gz"

# --- ESP and disk ----------------------------------------------------------------------
export MTOOLS_SKIP_CHECK=1 SOURCE_DATE_EPOCH=$epoch
esp=$work/esp.img
mkfs.vfat -C --invariant -i 50485954 -n PHYLLOME "$esp" $((esp_mib * 1024)) >/dev/null
efi() { cp "$1" "$work/$2" && touch -d "@$epoch" "$work/$2" && echo "$work/$2"; }
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
boot=BOOT${efiarch^^}.EFI
mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/shim$efiarch.efi.signed" "$boot")" ::/EFI/BOOT/
mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/mm$efiarch.efi.signed" "mm$efiarch.efi")" \
    ::/EFI/BOOT/
mcopy -m -i "$esp" "$(efi "$root/usr/lib/grub/$grubdir/grub$efiarch.efi.signed" \
    "grub$efiarch.efi")" ::/EFI/BOOT/
sed "s/console=ttyS0/console=$console/" "$here/tiny/grub.cfg" >"$work/grub.cfg.in"
mcopy -m -i "$esp" "$(efi "$work/grub.cfg.in" grub.cfg)" ::/EFI/debian/
mcopy -m -i "$esp" "$work/vmlinuz" "$work/initrd.gz" ::/

disk=$work/disk.raw
truncate -s "${disk_mib}M" "$disk"
sgdisk -U 7079786c-6c6f-4d65-8000-000000000001 \
    -n "1:2048:+${esp_mib}M" -t 1:ef00 -c "1:EFI system partition" \
    -u 1:7079786c-6c6f-4d65-8000-000000000002 "$disk" >/dev/null
dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none

# --- output ----------------------------------------------------------------------------
for f in vmlinuz initrd.gz disk.raw; do
    cp --sparse=always "$work/$f" "$out/$f"
    chmod 644 "$out/$f"
done
{
    printf '{\n  "name": "phyllome-tiny",\n'
    [ "$arch" = x86_64 ] || printf '  "arch": "%s",\n' "$arch"
    printf '  "kernel_version": "%s",\n' "$kver"
    printf '  "marker_prefix": "PHYLLOME-TINY: ",\n  "disk_format": "raw",\n'
    printf '  "packages": {'
    sep=
    while read -r name version; do
        printf '%s\n    "%s": "%s"' "$sep" "$name" "$version"
        sep=,
    done <"$work/packages"
    printf '\n  },\n  "files": {'
    sep=
    for f in vmlinuz initrd.gz disk.raw; do
        printf '%s\n    "%s": {"sha256": "%s", "size": %s}' "$sep" "$f" \
            "$(sha256sum "$out/$f" | cut -d' ' -f1)" "$(stat -c %s "$out/$f")"
        sep=,
    done
    printf '\n  }\n}\n'
} >"$out/manifest.json"
chmod 644 "$out/manifest.json"
echo "build-tiny: phyllome-tiny for $arch (kernel $kver) in $out"
