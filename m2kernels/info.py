"""``python -m m2kernels.info``: versions, loss backends, and which compiled extensions are usable.

Exit status 0 always (it is a report); ``--json`` prints the same facts as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import torch


def _triton() -> dict:
    if importlib.util.find_spec("triton") is None:
        return {"importable": False, "version": None}
    try:
        import triton

        return {"importable": True, "version": getattr(triton, "__version__", "unknown")}
    except Exception as e:  # noqa: BLE001 - report, never crash
        return {"importable": False, "version": None, "error": f"{type(e).__name__}: {e}"}


def collect() -> dict:
    """The facts printed by ``python -m m2kernels.info``, as a dict."""
    from . import _ext

    cuda = torch.cuda.is_available()
    ndev = torch.cuda.device_count() if cuda else 0
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    tr = _triton()
    backends = {
        "triton": tr["importable"] and (cuda or interpret),
        "torch": True,
        "reference": True,
    }
    if not _ext.disabled():
        _ext.load()  # so the report says whether it actually loads, not only whether a file exists
    extensions = {}
    for name, st in _ext.status().items():
        extensions[name] = {
            "built": st.path is not None,
            "path": st.path,
            "built_for_torch": st.built_for,
            "matches_running_torch": st.matches_torch,
            "loaded": st.loaded,
            "status": st.reason,
        }
    if _ext.disabled():
        for e in extensions.values():
            e["status"] = "M2_DISABLE_EXT=1: not loaded"
    nccl_version = None
    if extensions.get("_C_nccl", {}).get("loaded"):
        v = int(torch.ops.m2kernels.nccl_version())
        nccl_version = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(ndev)],
        "distributed_available": torch.distributed.is_available(),
        "nccl_in_torch": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
        "triton": tr,
        "triton_interpreter": interpret,
        "loss_backends": backends,
        "extensions": extensions,
        "collectives_path": "extension" if extensions["_C"]["loaded"] else "python (torch.distributed)",
        "nccl_native_version": nccl_version,
    }


def _yes(flag) -> str:
    return {True: "yes", False: "no", None: "-"}[flag]


def format_report(info: dict) -> str:
    tr = info["triton"]
    lines = [
        f"python        {info['python']}  ({info['platform']})",
        f"torch         {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})",
        f"triton        {tr['version'] if tr['importable'] else 'not importable'}"
        + (f"  ({tr['error']})" if tr.get("error") else ""),
        f"CUDA devices  {', '.join(info['cuda_devices']) if info['cuda_devices'] else 'none'}",
        f"distributed   {_yes(info['distributed_available'])}"
        f"  (NCCL in torch: {_yes(info['nccl_in_torch'])})",
        "",
        "loss backends",
        f"  triton      {_yes(info['loss_backends']['triton'])}"
        + ("  (TRITON_INTERPRET=1: CPU interpreter)" if info["triton_interpreter"] else
           "" if info["cuda_available"] else "  (needs CUDA, or TRITON_INTERPRET=1 on CPU)"),
        f"  torch       {_yes(info['loss_backends']['torch'])}",
        f"  reference   {_yes(info['loss_backends']['reference'])}",
        "",
        "extensions    built  for-torch        matches  loaded  status",
    ]
    for name, e in info["extensions"].items():
        lines.append(
            f"  {name:<11} {_yes(e['built']):<6} {e['built_for_torch'] or '-':<16} "
            f"{_yes(e['matches_running_torch']):<8} {_yes(e['loaded']):<7} {e['status']}"
        )
    lines += ["", f"collectives   {info['collectives_path']}"]
    if info["nccl_native_version"]:
        lines.append(f"NCCL native   {info['nccl_native_version']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
