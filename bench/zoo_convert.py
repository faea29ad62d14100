"""``minaction.convert`` over other libraries' model zoos: what it converts, and that nothing changes.

For each model of timm, torchvision, transformers and PyTorch Geometric that is installed here (none of them is a
dependency of minaction; the script skips what is missing): build it with random weights, run it in
eval mode, convert it, run it again, and report the largest output difference, how many modules of each
minaction kind it now holds, the energy of that forward, and how long ``convert`` took.

    python bench/zoo_convert.py [--libs timm torchvision transformers] [--json out.json]

A row with a difference above float rounding, a non-finite energy, or an error is a bug.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minaction  # noqa: E402

TIMM = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "vit_tiny_patch16_224",
        "convnext_atto", "regnetx_002", "densenet121", "mixer_s16_224", "ghostnet_100", "levit_128s",
        "coatnet_nano_rw_224", "efficientformer_l1", "poolformer_s12"]
TORCHVISION = ["alexnet", "vgg11", "squeezenet1_0", "resnet18", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5", "densenet121", "googlenet", "inception_v3",
               "convnext_tiny", "regnet_y_400mf", "swin_t", "vit_b_16", "maxvit_t"]


def _timm():
    import timm

    for name in TIMM:
        yield f"timm/{name}", lambda n=name: timm.create_model(n, pretrained=False, num_classes=10), \
            lambda: (torch.randn(2, 3, 224, 224),)


def _torchvision():
    import torchvision.models as tvm

    for name in TORCHVISION:
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        size = 299 if name == "inception_v3" else 224
        yield f"torchvision/{name}", lambda n=name, k=kw: getattr(tvm, n)(num_classes=10, **k), \
            lambda s=size: (torch.randn(2, 3, s, s),)


def _transformers():
    import transformers as T

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1000)
    ids = lambda: (torch.randint(0, 1000, (2, 16)),)  # noqa: E731
    yield "transformers/bert", lambda: T.BertForSequenceClassification(T.BertConfig(**small, num_labels=3)), ids
    yield "transformers/roberta", lambda: T.RobertaForMaskedLM(T.RobertaConfig(**small)), ids
    yield "transformers/distilbert", lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=1000)), ids
    yield "transformers/gpt2", lambda: T.GPT2LMHeadModel(
        T.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=0,
                     eos_token_id=0)), ids
    yield "transformers/llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2)), ids
    yield "transformers/opt", lambda: T.OPTForCausalLM(
        T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, vocab_size=1000,
                    word_embed_proj_dim=64, max_position_embeddings=64)), ids
    yield "transformers/bart", lambda: T.BartForConditionalGeneration(
        T.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000,
                     max_position_embeddings=64)), ids
    yield "transformers/vit", lambda: T.ViTForImageClassification(
        T.ViTConfig(**{k: v for k, v in small.items() if k != "vocab_size"}, image_size=32, patch_size=8,
                    num_labels=10)), lambda: (torch.randn(2, 3, 32, 32),)


def _pyg():
    import torch.nn.functional as F
    from torch import nn
    from torch_geometric.nn import GATConv, GCNConv, SAGEConv

    class Net(nn.Module):  # PyTorch Geometric's two-layer node classifier, as its examples write it
        def __init__(self, conv, act):
            super().__init__()
            self.conv1, self.conv2, self.act = conv(16, 32), conv(32, 4), act

        def forward(self, x, edge_index):
            x = self.act(self.conv1(x, edge_index))
            x = F.dropout(x, p=0.5, training=self.training)
            return F.log_softmax(self.conv2(x, edge_index), dim=1)

    def graph():
        g = torch.Generator().manual_seed(0)
        return torch.randn(20, 16, generator=g), torch.randint(0, 20, (2, 60), generator=g)

    for conv, act in ((GCNConv, F.relu), (SAGEConv, F.relu), (GATConv, F.elu)):
        yield f"torch_geometric/{conv.__name__}", lambda c=conv, a=act: Net(c, a), graph


LIBS = {"timm": _timm, "torchvision": _torchvision, "transformers": _transformers, "torch_geometric": _pyg}


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def check(name, build, inputs) -> dict:
    """One model: build, run, convert, run again. Returns its row."""
    torch.manual_seed(0)
    row = {"model": name}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build().eval()
            args = inputs()
            with torch.no_grad():
                before = _output(model(*args))
            t = time.perf_counter()
            model, rep = minaction.convert(model, return_report=True)
            row["convert_s"] = time.perf_counter() - t
            with torch.no_grad():
                after = _output(model(*args))
    except Exception as exc:  # noqa: BLE001 - a row says what failed
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return row
    scale = float(before.abs().max()) or 1.0
    row["max_rel_diff"] = float((after - before).abs().max()) / scale
    kinds = collections.Counter(type(m).__name__ for m in model.modules() if type(m).__module__.startswith("minaction"))
    row["kinds"] = dict(sorted(kinds.items()))
    row["converted"], row["left"] = len(rep.converted), len(rep.skipped)
    row["energy"] = float(minaction.total_energy(model)) if kinds else None
    return row


def run(libs, builders=None) -> list:
    rows = []
    for lib in libs:
        try:
            models = list((builders or LIBS)[lib]())
        except ImportError as exc:
            rows.append({"model": f"{lib}/*", "error": f"not installed here ({exc})"})
            continue
        for name, build, inputs in models:
            rows.append(check(name, build, inputs))
    return rows


def table(rows) -> str:
    lines = ["| model | minaction modules | converted / left | max rel. output diff | energy | convert s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | **{r['error']}** | | | | |")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in r["kinds"].items()) or "none"
        energy = "—" if r["energy"] is None else (f"{r['energy']:.4g}" if math.isfinite(r["energy"]) else "NaN")
        lines.append(f"| {r['model']} | {kinds} | {r['converted']} / {r['left']} | {r['max_rel_diff']:.1e} | "
                     f"{energy} | {r['convert_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(a.libs)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
