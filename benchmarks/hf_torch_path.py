"""Hugging Face models on the torch path: groups, kept parameters and exactness at ratio 0.5; the hidden pass.

Each model is built from its ``transformers`` config (random weights, no download), wrapped to return one tensor,
traced with :func:`graphprune.load_module`, pruned with a uniform plan and checked from the module
(``verify_module``) and from the program (``verify_program``). Then the hidden pass
(:func:`graphprune.backends.torch_rotation.slice_hidden_module`, 0.75 of the width) runs on the unpruned module and
(:func:`graphprune.backends.program_rotation.slice_hidden_program`) on its exported program, on 64 random inputs:
its relative output error, or the reason the stream froze. ``transformers`` is not a graphprune
dependency: install it beside ``torch==2.13.0`` to run this.

    python benchmarks/hf_torch_path.py [--out benchmarks/hf_torch_path.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.backends.exported_program import prune_program, verify_program
from graphprune.backends.torch_module import prune_module, verify_module
from graphprune.coupling.groups import build_groups
from graphprune.errors import GraphpruneError
from graphprune.frontends.torch.trace import load_module
from graphprune.planning.uniform import uniform_plan

SMALL = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512}
"""The size every model is built at (names as BERT's config spells them; the builders translate)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One model's result."""

    model: str
    prunable: int
    frozen: int
    kept_params: float | None
    module_error: float | None
    program: str
    hidden: str
    hidden_program: str


class _Output(nn.Module):
    """Call a Hugging Face model on token ids (or pixels) and return its first output tensor."""

    def __init__(self, model: nn.Module, key: str, **options: Any) -> None:
        super().__init__()
        self.model, self.key, self.options = model, key, options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}, **self.options)[0]


def _transformers() -> Any:
    """The ``transformers`` package, not ``benchmarks/transformers.py`` beside this script; None when absent."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _builders(tf: Any) -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    ids = torch.randint(0, 500, (2, 16))

    def bert() -> tuple[nn.Module, torch.Tensor]:
        return _Output(tf.BertModel(tf.BertConfig(vocab_size=500, **SMALL)), "input_ids"), ids

    def distilbert() -> tuple[nn.Module, torch.Tensor]:
        cfg = tf.DistilBertConfig(vocab_size=500, n_layers=2, dim=128, n_heads=4, hidden_dim=512)
        return _Output(tf.DistilBertModel(cfg), "input_ids"), ids

    def vit() -> tuple[nn.Module, torch.Tensor]:
        cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=1, num_labels=10, **SMALL)
        return _Output(tf.ViTForImageClassification(cfg), "pixel_values"), torch.randn(2, 1, 32, 32)

    def gpt2() -> tuple[nn.Module, torch.Tensor]:
        cfg = tf.GPT2Config(vocab_size=500, n_layer=2, n_embd=128, n_head=4, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
        return _Output(tf.GPT2LMHeadModel(cfg), "input_ids", use_cache=False), ids

    def llama() -> tuple[nn.Module, torch.Tensor]:
        cfg = tf.LlamaConfig(vocab_size=500, num_key_value_heads=2, max_position_embeddings=64, **SMALL)
        return _Output(tf.LlamaForCausalLM(cfg), "input_ids", use_cache=False), ids

    return {"bert": bert, "distilbert": distilbert, "vit": vit, "gpt2": gpt2, "llama": llama}


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(name: str, build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> Row:
    """Trace, prune at 0.5 and check one model."""
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    tm = load_module(model, [x])
    coupling = build_groups(tm.graph)
    prunable, frozen = len(coupling.prunable), len(coupling.groups) - len(coupling.prunable)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    try:
        pruned = prune_module(tm, coupling, plan)
        error = verify_module(tm, coupling, plan, pruned, [x])
        kept: float | None = _numel(pruned) / _numel(model)
    except GraphpruneError as exc:
        error, kept = None, None
        print(f"{name}: module: {exc}", file=sys.stderr)
    try:
        verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))
        program = "exact"
    except GraphpruneError as exc:
        program = f"refused: {exc}"
    return Row(name, prunable, frozen, kept, error, program, _hidden(model, x, False), _hidden(model, x, True))


def _hidden(model: nn.Module, x: torch.Tensor, as_program: bool) -> str:
    """The hidden pass at 0.75 of the width on 64 random inputs like ``x``, on the module or on its exported program
    (``as_program``): its relative error, or why it froze."""
    from graphprune.backends.program_rotation import slice_hidden_program
    from graphprune.backends.torch_model import module_model, program_model
    from graphprune.backends.torch_rotation import slice_hidden_module
    from graphprune.frontends.data import Calibration
    from graphprune.recovery.rotation import HiddenOptions

    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 500, (64, *x.shape[1:]), generator=gen) if not x.is_floating_point() \
        else torch.randn((64, *x.shape[1:]), generator=gen)
    data = Calibration((batch.numpy(),), None, "random")
    options = HiddenOptions(keep=0.75, samples=64, eval_samples=64)
    try:
        traced = module_model(model, [x])
        if as_program:
            assert traced.tm.program is not None
            _, report = slice_hidden_program(program_model(traced.tm.program), data, None, options)
        else:
            _, report = slice_hidden_module(traced, data, None, options)
    except GraphpruneError as exc:
        return f"refused: {exc}"
    if report.frozen:
        return f"frozen: {report.frozen}"
    return f"{report.width} -> {report.kept}, relative error {report.relative_error:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("hf_torch_path.json"))
    args = parser.parse_args(argv)
    transformers = _transformers()
    if transformers is None:
        print("hf_torch_path: transformers is not installed (pip install transformers torch==2.13.0)", file=sys.stderr)
        return 2
    rows = []
    for name, build in _builders(transformers).items():
        print(f"[hf_torch_path] {name}", flush=True)
        rows.append(run(name, build))
    print(f"{'model':<11} {'prunable':>8} {'frozen':>6} {'kept params':>11} {'module error':>12}  program  hidden 0.75 "
          "(module | program)")
    for r in rows:
        kept = f"{r.kept_params:.2f}" if r.kept_params is not None else "-"
        err = f"{r.module_error:.1e}" if r.module_error is not None else "refused"
        print(f"{r.model:<11} {r.prunable:>8} {r.frozen:>6} {kept:>11} {err:>12}  {r.program}  {r.hidden} | {r.hidden_program}")
    meta: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__, "size": SMALL,
                            "ratio": 0.5, "plan": "uniform"}
    args.out.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
