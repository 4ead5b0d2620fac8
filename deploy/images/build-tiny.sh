#!/bin/bash
# Build phyllome-tiny, the small real guest of the tests and the demo, into OUTDIR:
#   vmlinuz        Debian's signed cloud kernel (direct kernel boot)
#   initrd.gz      busybox-static initramfs whose /init prints PHYLLOME-TINY markers
#   disk.raw       sparse RAW GPT disk: ESP with signed shim -> signed GRUB -> the same
#                  kernel + initramfs; boots under OVMF with Secure Boot
#   manifest.json  sha256 and size of each file, kernel version, Debian package versions
#
# Usage: deploy/images/build-tiny.sh OUTDIR
#
# Needs no root mount and installs nothing: the Debian packages are fetched with
# `apt-get download` (into $PHYLLOME_TINY_DEBS when set, which makes later builds offline)
# and unpacked with `dpkg-deb -x`. Host tools: apt, dpkg, kmod (depmod, modprobe), cpio,
# gzip, gdisk (sgdisk), dosfstools (mkfs.vfat), mtools. Same packages and inputs give the
# same bytes (fixed GUIDs, volume id and timestamps).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
epoch=${SOURCE_DATE_EPOCH:-1700000000}
disk_mib=96
esp_mib=64
# Drivers the guest loads itself (the cloud kernel has TPM CRB/TIS and the 8250 UART built
# in, virtio and the rest as modules); modprobe adds their dependencies.
modules="virtio_pci virtio_blk virtio_net virtio_console virtio_rng virtio_balloon
         virtio_input virtiofs efivarfs button evdev"

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

# fetch PACKAGE: print the path of the .deb of apt's candidate version, downloading it
# into $debs unless it is there already.
fetch() {
    local pkg=$1 version arch file
    version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
    arch=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
        sed -n 's/^Architecture: //p')
    if [ -z "$version" ]; then
        echo "build-tiny: apt knows no package '$pkg'; run 'apt-get update' (Debian 12)" >&2
        exit 1
    fi
    file="$debs/${pkg}_${version//:/%3a}_${arch}.deb"
    if [ ! -s "$file" ]; then
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version" >&2) || {
            echo "build-tiny: 'apt-get download $pkg=$version' failed" >&2
            exit 1
        }
    fi
    echo "$pkg $version $file"
}

kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
    echo "build-tiny: cannot resolve linux-image-cloud-amd64; run 'apt-get update'" >&2
    exit 1
fi

root=$work/root
: >"$work/packages"
for pkg in "$kernel_pkg" busybox-static shim-signed shim-helpers-amd64-signed \
    grub-efi-amd64-signed; do
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
for applet in $("$tree/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
done
install -m 755 "$here/tiny/init" "$tree/init"
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
mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/shimx64.efi.signed" BOOTX64.EFI)" ::/EFI/BOOT/
mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/mmx64.efi.signed" mmx64.efi)" ::/EFI/BOOT/
mcopy -m -i "$esp" "$(efi "$root/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" \
    grubx64.efi)" ::/EFI/BOOT/
mcopy -m -i "$esp" "$(efi "$here/tiny/grub.cfg" grub.cfg)" ::/EFI/debian/
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
    printf '{\n  "name": "phyllome-tiny",\n  "kernel_version": "%s",\n' "$kver"
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
echo "build-tiny: phyllome-tiny (kernel $kver) in $out"
