"""What ``mrprune info`` shows: the model's family, block structure and current sparsity."""

from __future__ import annotations

from .models.adapter import get_adapter
from .models.loading import load_weights, open_source, resolve_device, resolve_dtype


def zero_fraction(adapter, index: int) -> float:
    refs = adapter.linear_layers(index)
    return sum(int((r.weight == 0).sum()) for r in refs) / sum(r.numel for r in refs)


def model_info(spec: str | None, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    source = open_source(spec, trust_remote_code, allow_pickle)  # weights only: no tokenizer needed to describe
    model = load_weights(source, resolve_dtype("auto", resolve_device("cpu")), trust_remote_code, allow_pickle)
    adapter = get_adapter(model)
    layers = adapter.all_linear_layers()
    zeros = sum(int((r.weight == 0).sum()) for r in layers)
    weights = sum(r.numel for r in layers)
    return {
        "source": source.description,
        "loaded_from": str(source.local_dir) if source.local_dir else source.description,
        "class": type(model).__name__,
        "family": adapter.family,
        "blocks_path": adapter.blocks_name,
        "num_blocks": adapter.num_blocks,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_linear_weights": weights,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "global_sparsity": zeros / weights,
        "layers": [{"name": r.short_name, "path": r.name, "shape": list(r.weight.shape)}
                   for r in adapter.linear_layers(0)],
        "routers": [name.removeprefix(f"{adapter.blocks_name}.0.") for name in adapter.routers(0)],
        "blocks": [zero_fraction(adapter, i) for i in range(adapter.num_blocks)],
    }
