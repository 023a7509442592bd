#!/usr/bin/env python3
"""Compiles every kernels/cuda/*.cu with NVRTC (through ctypes) for each
architecture given, straight to a cubin as the CUDA backend does, and exits
non-zero on any error. Used by scripts/check-cuda-kernels.sh."""
import ctypes
import glob
import os
import sys


def load_nvrtc():
    for name in ("libnvrtc.so.13", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    sys.exit("check-cuda-kernels: libnvrtc not found on LD_LIBRARY_PATH")


def compile_one(nvrtc, path, arch, include):
    """One .cu on its own: its own folder is on the include path (select.cuh)."""
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = [
        f"--gpu-architecture={arch}",
        "--std=c++17",
        f"--include-path={include}",
        f"--include-path={os.path.dirname(os.path.abspath(path))}",
        "-default-device",
    ]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ok = rc == 0
    if ok:
        cubin = ctypes.c_size_t()
        ok = nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) == 0 and cubin.value > 0
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace").strip()


def main():
    root, include, archs = sys.argv[1], sys.argv[2], sys.argv[3:]
    nvrtc = load_nvrtc()
    files = sorted(glob.glob(os.path.join(root, "kernels", "cuda", "*.cu")))
    if not files:
        sys.exit("check-cuda-kernels: no kernels/cuda/*.cu found")
    failed = 0
    for path in files:
        for arch in archs:
            ok, log = compile_one(nvrtc, path, arch, include)
            print(f"{'ok  ' if ok else 'FAIL'} {os.path.relpath(path, root)} {arch}")
            if log and not ok:
                print(log)
            failed += not ok
    if failed:
        sys.exit(f"check-cuda-kernels: {failed} compilation(s) failed")


if __name__ == "__main__":
    main()
