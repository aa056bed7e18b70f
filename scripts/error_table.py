"""Write docs/errors.md: every bad input we guard against, the exact line the user sees, and the exit code.

Each row comes from a real run of ``python -m mrprune`` on a tiny random model (made here, offline). Where the
condition cannot be produced honestly on any machine (a full disk, too little memory), the run patches the one
function that measures it, and the table says so.

    python scripts/error_table.py            # rewrites docs/errors.md (about 2-3 minutes)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

#: a CLI run with one measuring function replaced (the condition it simulates is named in the table)
PATCHED = """
import sys
{patch}
from mrprune.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
PATCHES = {
    "disk": "import mrprune.export as e, shutil\n"
            "real = shutil.disk_usage\n"
            "e.shutil = type('S', (), {'disk_usage': staticmethod(lambda p: real(p)._replace(free=1000))})",
    "memory": "import mrprune.preflight as p\np.host_available_bytes = lambda: 32 * 2**20",
}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def run(args: list[str], cwd: Path, patch: str | None = None, signal_after: tuple | None = None):
    """(exit code, the last stderr line starting with 'mrprune', or the last line)"""
    command = [sys.executable, "-m", "mrprune", *args]
    if patch:
        command = [sys.executable, "-c", PATCHED.format(patch=PATCHES[patch]), *args]
    if signal_after is None:
        result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, check=False)
        code, err = result.returncode, result.stderr
    else:
        sig, ckpt = signal_after
        process = subprocess.Popen(command, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        started = time.monotonic()
        while process.poll() is None:
            if ckpt is not None and (ckpt / "progress.json").exists():  # after the first finished block
                process.send_signal(sig)
                break
            if ckpt is None and time.monotonic() - started > 6:  # past the imports, into the run
                process.send_signal(sig)
                break
            time.sleep(0.005)
        _, err = process.communicate()
        code = process.returncode
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("mrprune")]
    return code, (ours or lines or [""])[-1]


@contextlib.contextmanager
def holding(checkpoint_dir: Path | None):
    """The checkpoint lock of ``checkpoint_dir`` held by this process, as a running mrprune holds it."""
    if checkpoint_dir is None:
        yield
        return
    from mrprune.checkpoint import LOCK
    from mrprune.locking import release, try_lock

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock(checkpoint_dir / LOCK)
    assert fd is not None
    try:
        yield
    finally:
        release(fd)


def make_models(root: Path) -> dict[str, Path]:
    import torch
    import transformers

    from mrprune.testing import train_tokenizer

    tok = train_tokenizer(384)

    def save(name, config, edit=None):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        if edit:
            edit(model)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    def llama(layers):
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                        bos_token_id=1, eos_token_id=2)

    models = {"tiny": save("tiny", llama(3)), "deep": save("deep", llama(48))}

    def poison(model):
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")

    models["nan"] = save("nan-model", llama(3), poison)

    def loud(model):  # fine in float32, beyond float16's range (65504) inside block 1's MLP
        with torch.no_grad():
            for proj in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj):
                proj.weight.mul_(3000)

    models["loud"] = save("loud-model", llama(3), loud)
    pickled = save("pickled", llama(3))
    state = transformers.AutoModelForCausalLM.from_pretrained(pickled).state_dict()
    for path in pickled.glob("*.safetensors"):
        path.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    models["pickled"] = pickled
    custom = save("custom-code", llama(3))
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                  "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    models["custom"] = custom
    bert = root / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50)).save_pretrained(bert)
    models["bert"] = bert
    models["gpt2"] = save("gpt2-ctx64", transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                                 vocab_size=384))
    models["jetmoe"] = save("jetmoe", transformers.JetMoeConfig(
        hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=96,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=384, bos_token_id=1, eos_token_id=2))
    # blocks that are not a chain: Dory runs its recurrent block twice (with a norm and a skip between), RWKV's
    # parent unpacks (hidden, state, attentions) from each block
    models["dory"] = save("dory", transformers.AutoConfig.for_model(
        "dory", hidden_size=64, num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=384,
        bos_token_id=1, eos_token_id=2))
    models["rwkv"] = save("rwkv", transformers.AutoConfig.for_model(
        "rwkv", hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128,
        context_length=128, vocab_size=384, bos_token_id=1, eos_token_id=2))
    truncated = save("truncated", llama(3))
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    models["truncated"] = truncated
    more_blocks = save("more-blocks", llama(3))  # config.json edited to declare a block its weights lack
    config = json.loads((more_blocks / "config.json").read_text())
    (more_blocks / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    no_tokenizer = save("no-tokenizer", llama(3))
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    return models


def cases(root: Path, m: dict[str, Path]) -> list[tuple[str, list[str], dict]]:
    """(what the user did, the command's arguments, run options)"""
    (root / "empty.txt").write_text("  \n")
    (root / "two.json").write_text("[0.5, 0.5]")
    (root / "typo.yaml").write_text("sparsty: 0.5\n")
    (root / "twice.yaml").write_text("metric: wanda\nsparsity: 0.6\nmetric: sparsegpt\n")
    (root / "numbers.jsonl").write_text('{"text": 5}\n{"text": null}\n')
    (root / "broken.gguf").write_bytes(b"not a gguf at all")
    (root / "not-a-model").mkdir(exist_ok=True)
    (root / "taken").mkdir(exist_ok=True)
    (root / "taken" / "keep.txt").write_text("x")
    (root / "busy").mkdir(exist_ok=True)
    (root / "busy" / "notes.txt").write_text("x")
    (root / "afile.txt").write_text("x")
    base = ["prune", "-q", "--model", "tiny", "--calib", "embedded"]
    tiny = base + ["--nsamples", "4", "--seqlen", "32"]
    deep = ["prune", "-q", "--model", "deep", "--calib", "embedded", "--nsamples", "8", "--seqlen", "64",
            "--metric", "sparsegpt"]
    return [
        ("sparsity out of range", tiny + ["--sparsity", "1.5"], {}),
        ("N:M pattern that does not divide the layer width", tiny + ["--pattern", "3:7"], {}),
        ("malformed N:M pattern", tiny + ["--pattern", "4:2"], {}),
        ("N:M pattern with a non-uniform allocation", tiny + ["--pattern", "2:4", "--allocation", "owl"], {}),
        ("non-positive sample count", base + ["--nsamples", "0"], {}),
        ("unknown metric (a usage error, from argparse)", tiny + ["--metric", "random"], {}),
        ("misspelled key in a --config file", ["prune", "--config", "typo.yaml"], {}),
        ("a key given twice in a --config file", ["prune", "--config", "twice.yaml"], {}),
        ("calibration documents without text in their column",
         ["prune", "-q", "--model", "tiny", "--calib", "numbers.jsonl", "--nsamples", "4", "--seqlen", "32"], {}),
        ("a flag of the exact MRP loop with fast MRP", tiny + ["--allocation", "mrp-fast", "--mrp-step", "0.1"], {}),
        ("too little calibration text", base + ["--nsamples", "500", "--seqlen", "512"], {}),
        ("missing calibration file", tiny + ["--calib", "no_such_file.txt"], {}),
        ("empty evaluation text", tiny + ["--eval", "--eval-text", "empty.txt"], {}),
        ("evaluation window longer than the text", tiny + ["--eval", "--eval-text", "embedded", "--eval-seqlen",
                                                           "1000000"], {}),
        ("too little calibration text left for --allocation auto's held-out windows",
         tiny + ["--allocation", "auto", "--auto-windows", "1000000"], {}),
        ("--allocation auto with a single candidate", tiny + ["--allocation", "auto", "--auto-candidates", "owl"], {}),
        ("missing ratios file", tiny + ["--allocation", "file", "--ratios", "missing.json"], {}),
        ("ratios file with the wrong number of blocks", tiny + ["--allocation", "file", "--ratios", "two.json"], {}),
        ("model path that does not exist", ["prune", "--model", "./nowhere"], {}),
        ("hub id while offline", ["prune", "--model", "some-org/some-model"], {}),
        ("directory that is not a model", ["prune", "--model", "not-a-model"], {}),
        ("config.json declaring a block the weights do not have", tiny[:3] + ["more-blocks"] + tiny[4:], {}),
        ("model folder without tokenizer files", tiny[:3] + ["no-tokenizer"] + tiny[4:], {}),
        ("broken GGUF file", ["eval", "broken.gguf"], {}),
        ("encoder model (BERT)", ["info", "bert"], {}),
        ("experts in 3-D tensors of a layout mrprune does not know (JetMoE)",
         ["prune", "--model", "jetmoe", "--calib", "embedded", "--nsamples", "4", "--seqlen", "32"], {}),
        ("a looped model: blocks run again, the hidden states changed between them (Dory)",
         ["prune", "--model", "dory", "--calib", "embedded", "--nsamples", "4", "--seqlen", "32"], {}),
        ("a parent that unpacks more than the hidden states from each block (RWKV)",
         ["prune", "--model", "rwkv", "--calib", "embedded", "--nsamples", "4", "--seqlen", "32"], {}),
        ("pickle-only weights without --allow-pickle", ["info", "pickled"], {}),
        ("custom model code without --trust-remote-code", tiny[:3] + ["custom-code"] + tiny[4:], {}),
        ("CUDA asked for on a machine without it", tiny + ["--device", "cuda"], {}),
        ("unknown dtype", tiny + ["--dtype", "float8"], {}),
        ("existing non-empty --output without --overwrite", tiny + ["--output", "taken"], {}),
        ("--output inside the input model", tiny + ["--output", "tiny/pruned"], {}),
        ("--overwrite on a directory mrprune did not write", tiny + ["--output", "taken", "--overwrite"], {}),
        ("--output below a file", tiny + ["--output", "afile.txt/pruned"], {}),
        ("--output where nothing can be created (Linux /proc, even as root)", tiny + ["--output", "/proc/pruned"], {}),
        ("an analysis's --output around the input model", ["analyze", "lps", "-q", "--model", "tiny", "--calib",
                                                           "embedded", "--output", ".", "--overwrite"], {}),
        ("--ratios without --allocation file", tiny + ["--ratios", "two.json"], {}),
        ("an evaluation option without --eval", tiny + ["--max-windows", "2"], {}),
        ("calibration windows longer than a learned position table (GPT-2, 64 positions)",
         ["prune", "-q", "--model", "gpt2-ctx64", "--calib", "embedded", "--nsamples", "4", "--seqlen", "128"], {}),
        ("truncated weights file", ["info", "truncated"], {}),
        ("misspelled zero-shot task", ["eval", "-q", "tiny", "--tasks", "hellswag"], {}),
        ("too little disk for the export (simulated: 1000 bytes free)", tiny + ["--output", "out-disk"], {"patch": "disk"}),
        ("too little disk for --offload-dir (simulated: 1000 bytes free)", tiny + ["--offload-dir", "scratch-disk"],
         {"patch": "disk"}),
        ("too little memory for the run (simulated: 32 MiB available)", tiny, {"patch": "memory"}),
        ("NaN in the model's weights", ["prune", "-q", "--model", "nan-model", "--calib", "embedded", "--nsamples",
                                         "4", "--seqlen", "32"], {}),
        ("float16 overflow inside a block", ["prune", "-q", "--model", "loud-model", "--calib", "embedded",
                                              "--nsamples", "4", "--seqlen", "32", "--dtype", "float16"], {}),
        ("--resume without --checkpoint-dir", tiny + ["--resume"], {}),
        ("--resume with an empty checkpoint directory", tiny + ["--checkpoint-dir", "ck-empty", "--resume"], {}),
        ("checkpoint directory holding someone else's files", tiny + ["--checkpoint-dir", "busy"], {}),
        ("--checkpoint-dir inside --output", tiny + ["--output", "out-x", "--checkpoint-dir", "out-x/ck"], {}),
        ("checkpoint directory in use by another run (its lock held meanwhile, as a running mrprune holds it)",
         tiny + ["--checkpoint-dir", "ck-held"], {"hold": root / "ck-held"}),
        ("--offload-dir inside the input model", tiny + ["--offload-dir", "tiny/scratch"], {}),
        ("--offload-dir that is a file", tiny + ["--offload-dir", "afile.txt"], {}),
        ("--offload-dir for an analysis", ["analyze", "lps", "-q", "--model", "tiny", "--calib", "embedded",
                                           "--offload-dir", "scratch"], {}),
        ("existing checkpoint, run again without --resume", tiny + ["--checkpoint-dir", "ck-done"],
         {"before": tiny + ["--checkpoint-dir", "ck-done"]}),
        ("--resume with different options than the checkpoint's", tiny + ["--checkpoint-dir", "ck-done", "--resume",
                                                                          "--sparsity", "0.6"], {}),
        ("Ctrl-C (SIGINT) without a checkpoint", deep + ["--output", "out-int", "--eval", "--eval-text", "embedded",
                                                        "--eval-seqlen", "64"], {"signal": (signal.SIGINT, None)}),
        ("Ctrl-C (SIGINT) with --checkpoint-dir", deep + ["--output", "out-int", "--checkpoint-dir", "ck-int"],
         {"signal": (signal.SIGINT, root / "ck-int")}),
        ("SIGTERM (e.g. a batch scheduler's time limit) with --checkpoint-dir",
         deep + ["--output", "out-term", "--checkpoint-dir", "ck-term"], {"signal": (signal.SIGTERM, root / "ck-term")}),
    ]


def markdown(rows: list[tuple[str, str, int, str]]) -> str:
    lines = [
        "# Errors and exit codes",
        "",
        "What `mrprune` says for each bad input or interruption it guards against. Every row is the real output of",
        "`python -m mrprune` on a tiny random model (regenerate with `python scripts/error_table.py`); paths are",
        "shortened to the run's folder (`.../`). Rows marked *simulated* replace the one function that measures free",
        "disk or memory. Every message is one line on stderr starting with `mrprune` (`mrprune: error:`; usage",
        "errors from argparse name the subcommand: `mrprune prune: error:`).",
        "",
        "Exit codes: **0** success; **2** a user error (bad option, input, model, output, resources, numerics,",
        "checkpoint); **130** interrupted by SIGINT (Ctrl-C); **143** interrupted by SIGTERM. Any other failure is a",
        "bug and keeps its Python traceback. An interrupted run leaves no output directory and no temporary files;",
        "with `--checkpoint-dir` it can be continued with `--resume` (see the README, *Long runs*).",
        "",
        "| input | command (after `mrprune`) | exit | message |",
        "| --- | --- | --- | --- |",
    ]
    for what, command, code, message in rows:
        lines.append(f"| {what} | `{command}` | {code} | `{message}` |".replace("\\", "\\\\"))
    return "\n".join(lines) + "\n"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mrprune-errors-"))
    models = make_models(root)
    rows = []
    for what, args, options in cases(root, models):
        if "before" in options:
            run(options["before"], root)
        with holding(options.get("hold")):
            code, message = run(args, root, options.get("patch"), options.get("signal"))
        message = message.replace(str(root), "...").replace("|", "\\|")
        shown = " ".join(a if " " not in a else repr(a) for a in args).replace(str(root), "...")
        rows.append((what, shown, code, message))
        print(f"{code:>4}  {what}: {message}", flush=True)
    out = ROOT / "docs" / "errors.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(markdown(rows), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
