"""Train pagedllm's demo model: a ~4M-parameter Llama that writes Python, on the CPU.

No model hub is reachable, so the project makes its own small model from text every Python
installation has: the standard library's own source (its top-level modules, sorted by name).
Reproducible: fixed seeds, fixed steps, two CPU threads. Saves an ordinary HF checkpoint
(config.json, model.safetensors, tokenizer files) with a README giving the losses and a sample.

Usage: python scripts/train_demo_model.py [--out models/pagedllm-demo] [--steps 1800]
"""

import argparse
import glob
import json
import math
import os
import platform
import sysconfig
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CHAT_TEMPLATE = ("{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}# assistant:\n{% endif %}")
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):"]


def corpus() -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "models", "pagedllm-demo"))
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.time()

    texts = corpus()
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    split = int(len(data) * 0.98)
    train, held_out = data[:split], data[split:]
    print(f"{len(texts)} files, {len(data):,} tokens ({time.time() - start:.0f} s)", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{num_params / 1e6:.2f}M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    g = torch.Generator().manual_seed(1)

    def batch(source):
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch_size,), generator=g)
        return torch.stack([source[s : s + args.seq_len] for s in starts.tolist()])

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            windows = held_out[: (len(held_out) // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:32]
            loss = model(windows, labels=windows).loss.item()
        model.train()
        return loss

    log = []
    model.train()
    for step in range(1, args.steps + 1):
        x = batch(train)
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            entry = {"step": step, "train_loss": round(loss.item(), 4), "elapsed_s": round(time.time() - start)}
            if step % 200 == 0 or step == args.steps:
                entry["held_out_loss"] = round(held_out_loss(), 4)
            log.append(entry)
            print(entry, flush=True)

    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        inputs = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        samples[prompt] = tokenizer.decode(out[0, inputs.shape[1]:])
    info = {"parameters": num_params, "tokens": len(data), "steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "train_seconds": round(time.time() - start), "log": log,
            "python": platform.python_version(), "torch": torch.__version__, "greedy_samples": samples}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_model_card(args.out, info)
    print(json.dumps(samples, indent=1))


def write_model_card(out: str, info: dict) -> None:
    """models/pagedllm-demo/README.md: what the model is, how it was trained, its losses and samples."""
    final = info["log"][-1]
    lines = [
        "# pagedllm-demo",
        "",
        f"A {info['parameters'] / 1e6:.1f}M-parameter Llama (4 layers, hidden 256, 4 query heads on 2 KV heads, "
        "vocabulary 4096, tied embeddings) trained by `scripts/train_demo_model.py` on the source of Python's "
        f"standard library (its top-level modules, Python {info['python']}: {info['tokens']:,} tokens of a "
        "byte-level BPE trained on the same text). It writes Python-looking code; it is the default model of "
        "pagedllm's demo, notebooks and the tests that need sensible text. An ordinary Hugging Face checkpoint: "
        "it loads in `transformers` as in pagedllm.",
        "",
        f"Training: {info['steps']} steps of {info['batch_size']} x {info['seq_len']} tokens, AdamW, cosine "
        f"schedule, on two CPU threads in {info['train_seconds'] / 60:.0f} minutes (torch {info['torch']}, seed 0).",
        f"Final training loss {final['train_loss']}, held-out loss {final.get('held_out_loss')} "
        "(the last 2% of the corpus).",
        "",
        "| step | training loss | held-out loss |",
        "|---|---|---|",
    ]
    lines += [f"| {e['step']} | {e['train_loss']} | {e.get('held_out_loss', '')} |"
              for e in info["log"] if "held_out_loss" in e]
    lines += ["", "Greedy samples (transformers `generate`, 48 new tokens):", ""]
    for prompt, text in info["greedy_samples"].items():
        lines += ["```python", prompt + text, "```", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
