"""``fastft-doctor`` (also ``python -m fastft.doctor``): checks fastft on this machine's device and reports what it
found, in a form to paste into a bug report.

    fastft-doctor                         # all five sections, shapes of Llama-3.1-8B
    fastft-doctor --quick --json doctor.json
    fastft-doctor --model ./my-model --sections numerics,speed --ops attention,rms_norm

Sections, printed as each completes: 1 environment (versions against the tested ones, the GPU, bitsandbytes' and
xformers' native libraries, fastft's choices of attention and dtype), 2 kernels' numerics (every op, forward and
backward, every dtype the device has, against float64 references), 3 kernels' speed (against the implementations
they replace), 4 training parity (a small 4-bit LoRA model trained by fastft and by transformers + peft +
bitsandbytes), 5 memory (a training step measured against fastft's accounting). Without a GPU the same sections
run on fastft's CPU paths at tiny sizes: the interpreted Triton kernels under ``TRITON_INTERPRET=1``, else the
PyTorch engine.

Exit status: 0 when every check passed, 1 when a check failed (the last lines name the kernels and the switches
that route them to PyTorch), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import sys
import time

SECTIONS = ("environment", "numerics", "speed", "parity", "memory")
TITLES = {"environment": "Environment", "numerics": "Kernels, numerics", "speed": "Kernels, speed",
          "parity": "Training parity", "memory": "Memory"}
QUICK = ("environment", "numerics")


def _kernel_names():
    from ..kernels._common import KERNEL_GROUPS, KERNEL_NAMES

    return KERNEL_NAMES, KERNEL_GROUPS


def build_parser() -> argparse.ArgumentParser:
    from ..memory.configs import KNOWN_MODELS

    names, groups = _kernel_names()
    parser = argparse.ArgumentParser(
        prog="fastft-doctor",
        description="Check fastft on this machine: the environment, every kernel's numerics against float64 "
                    "references, the kernels' speed against the implementations they replace, training parity with "
                    "transformers + peft + bitsandbytes, and memory against fastft's accounting. Prints a report to "
                    "paste into a bug report; exits 1 when a check fails, naming the switch that routes the kernel "
                    "around it.")
    parser.add_argument("--model", default="llama-3.1-8b",
                        help=f"the shapes of the kernel checks: a known name ({', '.join(KNOWN_MODELS)}), a local "
                             "model directory or a hub id in the offline cache (only its config is read; nothing is "
                             "downloaded)")
    parser.add_argument("--quick", action="store_true",
                        help="sections 1-2 only (environment, kernel numerics): under a minute on a GPU")
    parser.add_argument("--sections", metavar="LIST",
                        help=f"comma-separated sections to run, by number or name: "
                             f"{', '.join(f'{i} {name}' for i, name in enumerate(SECTIONS, 1))} (default: all)")
    parser.add_argument("--ops", metavar="LIST",
                        help=f"comma-separated kernels for sections 2 and 3, as FASTFT_DISABLE_KERNELS names them: "
                             f"{', '.join(names)}; groups: {', '.join(groups)} (default: all)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write everything (versions, device, date, command, every row) to PATH as JSON")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: the first GPU, else the CPU)")
    return parser


def _sections(args, parser) -> list[str]:
    if args.sections is None:
        return list(QUICK if args.quick else SECTIONS)
    chosen = set()
    for item in filter(None, (part.strip() for part in args.sections.split(","))):
        if item.isdigit() and 1 <= int(item) <= len(SECTIONS):
            chosen.add(SECTIONS[int(item) - 1])
        elif item in SECTIONS:
            chosen.add(item)
        else:
            parser.error(f"--sections: unknown section {item!r}; choose from 1-5 or {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in chosen]


def _ops(args, parser) -> set[str] | None:
    if args.ops is None:
        return None
    names, groups = _kernel_names()
    chosen = set()
    for item in filter(None, (part.strip() for part in args.ops.split(","))):
        if item in groups:
            chosen.update(groups[item])
        elif item in names:
            chosen.add(item)
        else:
            parser.error(f"--ops: unknown kernel {item!r}; choose from {', '.join(names)} or the groups "
                         f"{', '.join(groups)}")
    return chosen


def _device(args, parser):
    import torch

    if args.device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device: no CUDA GPU is visible to torch here")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            parser.error(f"--device: cuda:{device.index} does not exist ({torch.cuda.device_count()} GPUs visible)")
    elif device.type != "cpu":
        parser.error(f"--device: fastft runs on cuda or cpu, got {args.device!r}")
    return device


def _engine(device) -> tuple[str, str]:
    """(engine for use_engine, its description)."""
    from ..kernels._common import INTERPRET

    if device.type == "cuda":
        import torch

        return "triton", f"Triton kernels compiled for {torch.cuda.get_device_name(device)}"
    if INTERPRET:
        return "triton", "Triton kernels, interpreted on the CPU (TRITON_INTERPRET=1; tiny shapes)"
    return "torch", ("fastft's PyTorch engine on the CPU (no GPU; run with TRITON_INTERPRET=1 to check the Triton "
                     "kernels themselves in Triton's interpreter)")


class Doctor:
    """Runs the chosen sections in order, printing each as it completes, and keeps the record for the JSON."""

    def __init__(self, args, sections, ops, device, config, out=print):
        import torch

        from ..model import resolve_dtype

        self.args, self.sections, self.ops, self.device, self.config = args, sections, ops, device, config
        self.out = out
        self.tiny = device.type != "cuda"
        self.dtype = torch.float32 if self.tiny else resolve_dtype(None, device)
        self.engine, self.engine_text = _engine(device)
        self.failures: list[dict] = []
        self.record = {"tool": "fastft-doctor", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "command": shlex.join(["fastft-doctor", *(args.argv or [])]), "model": args.model,
            "sections_run": sections, "ops": sorted(ops) if ops else "all", "engine": self.engine_text,
            "FASTFT_DISABLE_KERNELS": os.environ.get("FASTFT_DISABLE_KERNELS"), "sections": {}}

    def run(self) -> int:
        from ..kernels import use_engine

        self.out(f"fastft-doctor: {self.record['command']}  ({self.record['date']})")
        self.out(f"device {self.device}; kernels: {self.engine_text}")
        if os.environ.get("FASTFT_DISABLE_KERNELS"):
            self.out(f"FASTFT_DISABLE_KERNELS={os.environ['FASTFT_DISABLE_KERNELS']} is set (training would route "
                     "those kernels to PyTorch); the doctor checks the kernels themselves")
        if "environment" not in self.sections:  # the versions and the device go into every report
            self.record["versions"] = self._versions()
        for number, name in enumerate(SECTIONS, 1):
            if name not in self.sections:
                continue
            started = time.perf_counter()
            with use_engine(self.engine), _on(self.device):
                try:
                    getattr(self, name)(number)
                except Exception as exc:  # noqa: BLE001 - a section that crashes is reported, the others still run
                    self.out(f"  ERROR: {type(exc).__name__}: {exc}")
                    self.record["sections"][name] = {"status": "error", "problem": f"{type(exc).__name__}: {exc}"}
                    self.failures.append({"section": name, "switch": None, "what": name,
                                          "problem": f"{type(exc).__name__}: {exc}"})
            self.record["sections"].setdefault(name, {})["seconds"] = time.perf_counter() - started
        return self.verdict()

    def _versions(self) -> dict:
        from . import environment

        return {"libraries": environment.library_versions(), "device": environment.device_facts(self.device)}

    # ---- sections ------------------------------------------------------------------------------
    def environment(self, number):
        from . import environment
        from .report import environment_lines, heading

        self.out(heading(number, TITLES["environment"], f"shapes of {self.args.model}"))
        env = environment.collect(self.config, self.device, self.args.model)
        self.record["sections"]["environment"] = env
        self.record["versions"] = {"libraries": env["libraries"], "device": env["device"]}
        self.out(environment_lines(env))
        if env["bitsandbytes"].get("ok") is False:
            self.failures.append({"section": "environment", "switch": None, "what": "bitsandbytes",
                                  "problem": env["bitsandbytes"].get("problem")})

    def numerics(self, number):
        from . import numerics
        from .environment import supported_dtypes
        from .report import heading, numerics_header, numerics_line

        sizes = numerics.sizes_from_config(self.config, self.args.model, self.tiny, self._max_vocab())
        dtypes, skipped = supported_dtypes(self.device)
        cases = [case for case in numerics.build_cases(sizes) if self.ops is None or case.switch in self.ops]
        self.out(heading(number, TITLES["numerics"], f"{sizes.label}; {sizes.tokens} tokens per sequence"))
        self.out("  error: max |fastft - float64 reference| / max |reference| of the worst tensor (outputs and "
                 "gradients); first call: includes compilation")
        for note in skipped:
            self.out(f"  not checked: {note}")
        self.out(numerics_header())
        rows = []
        for case in cases:
            for dtype in dtypes:
                row = numerics.run_case(case, dtype, self.device)
                rows.append(row)
                self.out(numerics_line(row))
                if row["status"] != "pass":
                    self.failures.append({"section": "numerics", "switch": row["switch"],
                                          "what": f"{row['op']} ({row['case']}, {row['dtype']})",
                                          "problem": row.get("exception") or row.get("problem")})
        self.record["sections"]["numerics"] = {"engine": self.engine_text, "sizes": vars(sizes), "rows": rows,
                                               "not_checked": skipped}

    def speed(self, number):
        from . import speed
        from .report import fmt, heading, speed_lines

        peak, peak_source = speed.peak_bandwidth(self.device)
        timer = speed.Timer(self.device)
        S = speed.model_shapes(self.config, self.tiny)
        what = "CUDA events, median of 20 after 5 warm-up runs" if timer.cuda else (
            "CPU, one call each by perf_counter, the case table's tiny shapes: NOT speed figures")
        self.out(heading(number, TITLES["speed"], what))
        self.out(f"  peak memory bandwidth: {fmt(peak, '.0f')} GB/s ({peak_source})")
        rows, setups = [], {}
        for case in speed.selected_cases(self.ops):
            self.out(f"  measuring {case.op} ...")
            rows.append(speed.measure_case(case, timer, S, self.dtype, setups, peak))
        section = {"timing": what, "peak_bandwidth_gbps": peak, "peak_bandwidth_source": peak_source,
                   "dtype": str(self.dtype).replace("torch.", ""), "rows": rows}
        self.record["sections"]["speed"] = section
        self.out(speed_lines(section))

    def parity(self, number):
        from . import parity
        from .report import heading, parity_lines

        self.out(heading(number, TITLES["parity"], "fastft vs transformers + peft + bitsandbytes"))
        with _quiet():
            result = parity.run(self.device, self.dtype, self.tiny, progress=self.out)
        self.record["sections"]["parity"] = result
        self.out(parity_lines(result))
        if result["status"] != "pass":
            self.failures.append({"section": "parity", "switch": None, "what": "training parity",
                                  "problem": result["problem"]})

    def memory(self, number):
        from . import parity, step_memory
        from .report import heading, memory_lines

        self.out(heading(number, TITLES["memory"], "one training step measured vs fastft's accounting"))
        self.out("  measuring and accounting one step ...")
        with _quiet():
            result = step_memory.run(parity.parity_config(self.tiny), self.device, self.dtype, self.tiny)
        self.record["sections"]["memory"] = result
        self.out(memory_lines(result))

    def _max_vocab(self) -> int | None:
        """On a GPU, the vocabulary the lm-head checks can hold in float64 with room to spare (40% of the memory):
        fp32 head and gradient plus their float64 copies, 24 bytes per weight."""
        if self.device.type != "cuda":
            return None
        import torch

        total = torch.cuda.get_device_properties(self.device).total_memory
        return max(4096, int(0.4 * total / (24 * self.config.hidden_size)))

    # ---- verdict ------------------------------------------------------------------------------
    def verdict(self) -> int:
        from .report import disable_switches, write_json

        code = 1 if self.failures else 0
        self.record["failures"] = self.failures
        switches = list(dict.fromkeys(f["switch"] for f in self.failures if f["switch"]))
        self.record["disable_kernels"] = switches
        self.record["exit_code"] = code
        lines = [""]
        skipped = [name for name, section in self.record["sections"].items() if section.get("status") == "skipped"]
        ran = [name for name in self.sections if name not in skipped]
        skip_note = f"; skipped: {', '.join(skipped)} (see above)" if skipped else ""
        if not self.failures:
            lines.append(f"fastft-doctor: every check passed ({', '.join(ran)}){skip_note}.")
        else:
            lines.append(f"fastft-doctor: {len(self.failures)} check(s) FAILED:")
            lines += [f"  - {f['section']}: {f['what']}: {str(f['problem'])[:300]}" for f in self.failures]
            if any("CUDA error" in str(f["problem"]) for f in self.failures):
                lines.append("  A CUDA error leaves the GPU unusable for the rest of the process: the checks after the "
                             "first one may have failed only because of it; rerun with --ops to check them apart.")
            if switches:
                lines.append(f"Route the failing kernel(s) to fastft's PyTorch path ({', '.join(switches)}):")
                lines += disable_switches(switches)
            if any(f["switch"] is None for f in self.failures):
                lines.append("  (a failure without a kernel name has no single switch; FASTFT_DISABLE_KERNELS=all "
                             "turns every kernel off)")
            lines.append("Please report it with the JSON (--json PATH) at the project's issue tracker.")
        if self.args.json:
            write_json(self.args.json, self.record)
            lines.append(f"report written to {self.args.json}")
        self.out("\n".join(lines))
        return code


@contextlib.contextmanager
def _on(device):
    if device.type == "cuda":
        import torch

        with torch.cuda.device(device):
            yield
    else:
        yield


@contextlib.contextmanager
def _quiet():
    """The stand-in models of sections 4-5 make transformers warn about deprecations and fastft log its routing;
    not news to the reader."""
    from ..memory.accounting import _quiet as quiet

    with quiet():
        yield


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    sections, ops = _sections(args, parser), _ops(args, parser)
    device = _device(args, parser)
    from ..memory.configs import UnknownModelError, load_config

    try:
        config = load_config(args.model)
    except UnknownModelError as exc:
        parser.error(f"--model: {exc}")
    return Doctor(args, sections, ops, device, config).run()
