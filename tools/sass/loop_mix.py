#!/usr/bin/env python3
"""The main loops of CUDA kernels as ptxas compiles them for sm_90, without a GPU: NVRTC (the
pip wheel's libnvrtc, as the cuda_nvrtc test uses) makes a cubin, cuobjdump lists its SASS, and
each backward branch (a loop) is reported with its instruction count and opcode mix. A loop's
static size is what one iteration issues when its branches are all taken (a masked and an
unmasked path both count), which is enough to compare two versions of a kernel.

usage: loop_mix.py SOURCE[+SOURCE...] KERNEL [KERNEL...] [-- NVRTC_OPTION ...]
  e.g. (the attention module: its files in kernels.rs' ATTENTION_SOURCE order)
  k=engine/src/cuda/kernels; tools/sass/loop_mix.py $k/attention.cuh+$k/attention_f32.cu+$k/attention_mma.cuh+$k/attention_wgmma.cuh+$k/attention_operands.cu+$k/attention_mma_forward.cu+$k/attention_mma_backward.cu attention_forward_bf16_d64
env: SASS_ARCH (default sm_90; sm_90a for the wgmma kernels), NVRTC_LIB (default: the cu13 wheel under /opt/cuda-pip or $SMELT_CUDA_PIP), CUOBJDUMP
     (default: cuobjdump on PATH, else the one Triton's wheel ships)
"""
import collections, ctypes, glob, os, re, shutil, subprocess, sys, tempfile


def nvrtc():
    root = os.environ.get("SMELT_CUDA_PIP", "/opt/cuda-pip")
    lib = os.environ.get("NVRTC_LIB") or next(iter(glob.glob(f"{root}/nvidia/cu13/lib/libnvrtc.so.13")), "libnvrtc.so.13")
    libdir = os.path.dirname(lib)
    # libnvrtc opens its builtins by name: load them first so that name is found without
    # LD_LIBRARY_PATH
    for b in glob.glob(os.path.join(libdir, "libnvrtc-builtins.so.*")):
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(lib), libdir


def cubin(sources, options):
    lib, libdir = nvrtc()
    src = "".join(open(f).read() for f in sources)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    inc = os.path.join(os.path.dirname(libdir), "include")
    opts = [f"--gpu-architecture={os.environ.get('SASS_ARCH', 'sm_90')}".encode(), b"--std=c++17", f"-I{inc}".encode()] + [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode(errors="replace"))
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def cuobjdump():
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not found:
        try:
            import triton  # its wheel ships cuobjdump
            found = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        except ImportError:
            sys.exit("no cuobjdump: set CUOBJDUMP or install the triton wheel")
    return found


def loops(sass):
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    out = []
    for addr, op, rest in ins:
        m = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            out.append((target, addr, [o for (a, o, _) in ins if target <= a <= addr]))
    return sorted(out, key=lambda l: -len(l[2]))


def main():
    args = sys.argv[1:]
    options = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    if len(args) < 2:
        sys.exit(__doc__)
    sources, kernels = args[0].split("+"), args[1:]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin(sources, options))
        f.flush()
        for k in kernels:
            sass = subprocess.run([cuobjdump(), "-sass", "-fun", k, f.name], capture_output=True, text=True).stdout
            found = loops(sass)
            if not found:
                print(f"{k}: no loop (or no such kernel)")
                continue
            target, end, body = found[0]
            mix = collections.Counter(o.split(".")[0] for o in body)
            print(f"{k}: main loop {len(body)} instructions; " + " ".join(f"{o}:{n}" for o, n in mix.most_common(12)))


if __name__ == "__main__":
    main()
