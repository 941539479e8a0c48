"""Build the RDMA VM's initramfs (tests/harness/rdma_vm/run calls this; stdlib only).

    python3 build_initrd.py MODULES_DIR INIT OUT.cpio.gz

MODULES_DIR is an unpacked Debian kernel's lib/modules/<version> (after depmod).
The archive (cpio "newc", gzip) holds: a static busybox, INIT as /init, the
kernel modules the guest needs (9p over virtio for the host's files, veth, and
soft-RoCE with its verbs interface) uncompressed under /mods with their load
order in /mods/order, empty mount points, and /dev/console so that init has a
console before devtmpfs is mounted.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import subprocess
import sys
from pathlib import Path

# What the guest loads, dependencies first. crc32_generic is no link-time
# dependency of rdma_rxe, which asks the crypto API for "crc32" at run time.
WANTED = ("crc32_generic", "virtio_pci", "9pnet_virtio", "9p", "veth", "rdma_rxe", "ib_uverbs")
MOUNT_POINTS = ("proc", "sys", "dev", "host", "mods", "bin")


def module_graph(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (path relative to modules_dir, names it depends on), from modules.dep."""
    def name_of(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    graph: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        graph[name_of(path)] = (path, [name_of(d) for d in deps.split()])
    return graph


def load_order(graph: dict[str, tuple[str, list[str]]], wanted: tuple[str, ...]) -> list[str]:
    """Every wanted module and its dependencies, each after what it needs."""
    order: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in graph:
            raise SystemExit(f"build_initrd: module {name} (needed by {' <- '.join(chain) or 'the VM'}) "
                             "is not in this kernel")
        for dep in graph[name][1]:
            add(dep, (name, *chain))
        order.append(name)

    for name in wanted:
        add(name, ())
    return order


def module_bytes(path: Path) -> bytes:
    """A .ko file's contents, uncompressed (busybox insmod takes plain ELF)."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):  # no zstd in this Python's stdlib: the zstd tool
        return subprocess.run(["zstd", "-dcq", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


class Newc:
    """A minimal writer of the cpio "newc" format the kernel unpacks."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        self.out += b"\0" * (-len(self.out) % 4) + data
        self.out += b"\0" * (-len(self.out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    modules_dir, init, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    busybox = Path("/bin/busybox")  # busybox-static's: the initramfs has no libc
    if not busybox.exists():
        raise SystemExit("build_initrd: no /bin/busybox (apt-get install busybox-static)")
    graph = module_graph(modules_dir)
    order = load_order(graph, WANTED)
    cpio = Newc()
    for d in MOUNT_POINTS:
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init.read_bytes(), 0o755)
    for name in order:
        cpio.file(f"mods/{name}.ko", module_bytes(modules_dir / graph[name][0]))
    cpio.file("mods/order", ("\n".join(order) + "\n").encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
    tmp.replace(out)  # a half-written initramfs never looks finished
    print(f"rdma-vm: initramfs {out} with {' '.join(order)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
