"""Compile options and the environment knobs that feed them.

| variable               | meaning                                                                     |
|------------------------|-----------------------------------------------------------------------------|
| `MOECC_DUMP_DIR`       | write pass-level dumps under this folder (same as `dump_dir=`)              |
| `MOECC_DEBUG`          | 1: pass timings, 2: decisions (lifted/fused/refused), 3: IR after each pass |
|                        | any level >= 1 also runs the checker (graph lint + pass invariants)         |
| `MOECC_DISABLE_PASSES` | comma-separated pass names to switch off (same as `disable_passes=`)        |
| `MOECC_GROUPED_GEMM`   | the default of `grouped_gemm=`                                              |
| `MOECC_EXCHANGE`       | the default of `exchange=`                                                  |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

BACKENDS = ("auto", "torch", "triton")
GROUPED_GEMMS = ("auto", "triton", "native")
EXCHANGES = ("auto", "counted", "padded")


class MoeccError(RuntimeError):
    """An error in the user's model or options that moecc detected; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options of `moecc.compile`.

    Attributes:
        ep: expert-parallel degree; None picks it from the world size (1 in one process).
        backend: "auto" (triton on a GPU, torch elsewhere), "torch" (stock PyTorch ops) or "triton"
            (Triton kernels: a CUDA GPU, or the CPU under TRITON_INTERPRET=1).
        dump_dir: folder for pass-level dumps (IR after each pass, plan, index); None for none.
        verify: check every lifted MoE region numerically against the model's own code at compile time
            and raise on a mismatch.
        disable_passes: pass names to skip (see `moecc.passes.PIPELINE`).
        allow_fallback: when an MoE-looking module cannot be lifted, run the model's own code for it and
            report that in the dumps instead of raising.
        debug: 0-3, as `MOECC_DEBUG`; >= 1 runs the checker after every pass.
        dynamic: passed to torch.compile (None lets Dynamo decide; False specialises on every shape).
        capacity_factor: None (dropless, the default) or a factor f: each expert then takes at most
            C = ceil(f * T * K / E) routed (token, slot) pairs per step, T the tokens of the whole ep-group;
            it keeps the first ones in (sending rank, token, slot) order and drops the rest. A dropped pair
            adds nothing to its token's output (the remaining weights are not renormalised).
        profile: a hardware profile file (`moecc calibrate` writes one) for the cost model; None uses
            $MOECC_PROFILE, else the profile calibrate saved for this device, else built-in figures.
        bucket_mb: gradient all-reduce bucket size in MiB; None lets the cost model choose.
        profile_nodes: run compiled graphs node by node inside profiler ranges, so that
            `moecc.profile_step` can compare each node's measured time with its prediction (slower).
        chunks: token chunks per sharded MoE region (1 to 8), so that one chunk's all-to-alls overlap
            another's expert compute; None lets the cost model choose. Sizes differ by at most one token.
        cuda_graph: the step will be replayed from a CUDA graph (`moecc.graph_step`): a sharded MoE region
            that a replay cannot run (one left unfused, whose all-to-all row counts the host reads every step)
            is an error at compile time, and the cost model charges no host time to issue the graphs' nodes
            (a replay issues none).
        grouped_gemm: with the triton backend, the kernel of the plain grouped GEMMs (forward, dX, dW; the
            fused expert-parallel ops have their own): "triton" (the default) moecc's Triton kernels,
            "native" `torch._grouped_mm`, "auto" times both at each GEMM's shape when compiling on a GPU
            and keeps the faster (Triton unless native is at least 3 % faster; the CPU keeps Triton). "auto"
            allocates each GEMM's operands once at compile time and may choose differently on different
            ranks. `MOECC_GROUPED_GEMM` sets the default. The dumps record each choice and its timings.
        exchange: how a sharded MoE region left unfused (the all-to-all path) sizes its row all-to-alls:
            "counted" exchanges each step's row counts and copies them to the host (one synchronisation a
            layer; only the rows needed travel), "padded" sends every token to every rank of the ep-group,
            those with no expert there as padding (ep * T rows a rank, no synchronisation, so a CUDA graph
            can replay it; every rank must then hold the same number of tokens every step), "auto" (the
            default) is "padded" with cuda_graph=True, or where every rank holds the same token count (a fixed
            one, or under dynamic shapes one from the input shapes, which check_inputs compares across ranks
            every call; priced at its traced value) and the cost model
            puts the padding's extra rows at no more than the count exchange and host synchronisation they
            save (`cost.exchange_costs_us`: on one H200 node padding won at every top-k measured, across
            slower links it loses where tokens have few experts each), else "counted"; the choice is the same
            on every rank, and the dumps say which and why. `MOECC_EXCHANGE` sets the default. Regions fused
            across ranks have their own exchange.
        check_inputs: with more than one rank, every call first compares the shapes and dtypes of its
            tensor arguments, its grad mode and the module's train/eval mode across the world (a 16-byte
            all-reduce over a gloo group: host work, about 0.26 ms on an H200 node, no device
            synchronisation) and raises on every rank, naming the input or mode, where they differ. False
            skips it: a rank called with other shapes then recompiles alone or exchanges rows its peers did
            not size buffers for, which hangs the ranks until the process group's timeout.
    """

    ep: int | None = None
    backend: str = "auto"
    dump_dir: str | None = None
    verify: bool = False
    disable_passes: tuple[str, ...] = ()
    allow_fallback: bool = False
    debug: int = 0
    dynamic: bool | None = False
    capacity_factor: float | None = None
    profile: str | None = None
    bucket_mb: float | None = None
    profile_nodes: bool = False
    chunks: int | None = None
    cuda_graph: bool = False
    grouped_gemm: str = "triton"
    exchange: str = "auto"
    check_inputs: bool = True

    @staticmethod
    def make(
        *,
        ep: int | None = None,
        backend: str = "auto",
        dump_dir: str | os.PathLike | None = None,
        verify: bool = False,
        disable_passes: Sequence[str] = (),
        allow_fallback: bool = False,
        debug: int | None = None,
        dynamic: bool | None = False,
        capacity_factor: float | None = None,
        profile: str | os.PathLike | None = None,
        bucket_mb: float | None = None,
        profile_nodes: bool = False,
        chunks: int | None = None,
        cuda_graph: bool = False,
        grouped_gemm: str | None = None,
        exchange: str | None = None,
        check_inputs: bool = True,
    ) -> CompileOptions:
        """Build options from keyword arguments and the MOECC_* environment variables."""
        from moecc.passes import PASS_NAMES  # the pipeline owns the pass names

        if backend not in BACKENDS:
            raise MoeccError(f"moecc.compile: backend={backend!r} is not one of {BACKENDS}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise MoeccError(f"moecc.compile: capacity_factor={capacity_factor!r} must be > 0 (or None: dropless)")
        if ep is not None and (not isinstance(ep, int) or ep < 1):
            raise MoeccError(f"moecc.compile: ep={ep!r} must be a positive integer or None")
        env_disabled = [p for p in os.environ.get("MOECC_DISABLE_PASSES", "").split(",") if p.strip()]
        disabled = tuple(dict.fromkeys([*disable_passes, *(p.strip() for p in env_disabled)]))
        unknown = [p for p in disabled if p not in PASS_NAMES]
        if unknown:
            raise MoeccError(
                f"moecc.compile: unknown pass name(s) {unknown} in disable_passes; passes are {PASS_NAMES}"
            )
        if bucket_mb is not None and not bucket_mb > 0:
            raise MoeccError(f"moecc.compile: bucket_mb={bucket_mb!r} must be > 0 (or None: the cost model's choice)")
        if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= 8):
            raise MoeccError(
                f"moecc.compile: chunks={chunks!r} must be an integer from 1 to 8 (or None: the cost model's choice)"
            )
        if grouped_gemm is None:
            grouped_gemm = os.environ.get("MOECC_GROUPED_GEMM", "triton") or "triton"
        if grouped_gemm not in GROUPED_GEMMS:
            raise MoeccError(
                f"moecc.compile: grouped_gemm={grouped_gemm!r} (or MOECC_GROUPED_GEMM) is not one of {GROUPED_GEMMS}"
            )
        if exchange is None:
            exchange = os.environ.get("MOECC_EXCHANGE", "auto") or "auto"
        if exchange not in EXCHANGES:
            raise MoeccError(f"moecc.compile: exchange={exchange!r} (or MOECC_EXCHANGE) is not one of {EXCHANGES}")
        if profile is not None:
            from moecc import cost

            cost.load_profile(profile)  # a bad file is an error here, not at the first call
        if dump_dir is None and os.environ.get("MOECC_DUMP_DIR"):
            dump_dir = os.environ["MOECC_DUMP_DIR"]
        if debug is None:
            debug = int(os.environ.get("MOECC_DEBUG", "0") or 0)
        return CompileOptions(
            ep=ep,
            backend=backend,
            dump_dir=os.fspath(dump_dir) if dump_dir is not None else None,
            verify=verify,
            disable_passes=disabled,
            allow_fallback=allow_fallback,
            debug=debug,
            dynamic=dynamic,
            capacity_factor=capacity_factor,
            profile=os.fspath(profile) if profile is not None else None,
            bucket_mb=bucket_mb,
            profile_nodes=profile_nodes,
            chunks=chunks,
            cuda_graph=bool(cuda_graph),
            grouped_gemm=grouped_gemm,
            exchange=exchange,
            check_inputs=bool(check_inputs),
        )

    def enabled(self, pass_name: str) -> bool:
        return pass_name not in self.disable_passes
