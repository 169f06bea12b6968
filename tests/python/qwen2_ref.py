#!/usr/bin/env python3
"""Independent PyTorch / Hugging Face transformers reference for Rust Qwen2.

Every subcommand reads/writes JSON (JSON Lines for batched data) so the Rust
tests can drive it as a subprocess.  Nothing is ever downloaded: the hub is
forced offline and all models/tokenizers come from local directories.

Run with the project venv::

    PY=~/.cache/prime-rs/venv/bin/python

    # Tiny random Qwen2 checkpoint (GQA, untied, f32, single file).
    $PY tests/python/qwen2_ref.py make --out /tmp/q2 [--vocab 300] \
        [--hidden 64] [--layers 2] [--heads 4] [--kv-heads 2] \
        [--intermediate 128] [--tied|--untied] [--rope-theta 10000] \
        [--max-pos 512] [--dtype float32|bfloat16] [--shard-size BYTES] \
        [--seed 0] [--bos-id N] [--eos-id N [N ...]] [--pad-id N] \
        [--init-std 0.2] [--legacy-config]

    # Next-token log-probs, one sequence at a time, computed in float32.
    $PY tests/python/qwen2_ref.py logprobs --model DIR --input IN.jsonl \
        --output OUT.jsonl [--dtype float32|bfloat16] [--attn eager|sdpa]

    # Greedy decoding through model.generate (new tokens only, EOS kept).
    $PY tests/python/qwen2_ref.py greedy --model DIR --input IN.jsonl \
        --output OUT.jsonl --max-new-tokens N [--attn eager|sdpa]

    # Chat template rendering and tokenisation.
    $PY tests/python/qwen2_ref.py chat --tokenizer DIR --input IN.jsonl \
        --output OUT.jsonl

    # Plain encoding (add_special_tokens=False).
    $PY tests/python/qwen2_ref.py encode --tokenizer DIR --input IN.jsonl \
        --output OUT.jsonl

    # Prove two checkpoints load to bitwise-identical f32 state dicts.
    $PY tests/python/qwen2_ref.py compare --model A --other B

    # Small local byte-level BPE tokenizer with the Qwen2 ChatML template
    # (for tests that need a tokenizer without hub access).
    $PY tests/python/qwen2_ref.py make-tokenizer --out DIR [--vocab-size 400]

JSONL formats:
    logprobs: in {"input_ids": [...]}  -> out {"logprobs": [len-1 floats]}
              (value t-1 is log p(ids[t] | ids[:t]))
    greedy:   in {"input_ids": [...]}  -> out {"output_ids": [...]}
    chat:     in {"messages": [...], "add_generation_prompt": bool}
              -> out {"text": str, "ids": [...]}
    encode:   in {"text": str}         -> out {"ids": [...], "decoded": str}

The number of torch threads is taken from $PRIME_THREADS (default 2).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(int(os.environ.get("PRIME_THREADS", "2")))
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}

# The Qwen2-Instruct ChatML template (as shipped with Qwen/Qwen2-*-Instruct).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenisation regex (from Qwen/Qwen2 tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def read_jsonl(path):
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_model(path, dtype=torch.float32, attn="eager"):
    """Load a causal LM from a local dir in `dtype`, eval mode, on CPU."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, local_files_only=True)
    model.eval()
    return model


def load_tokenizer(path):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def as_id_list(x):
    """apply_chat_template(tokenize=True) may return a list, a tensor or a
    BatchEncoding depending on the transformers version."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


def eos_ids(model):
    """EOS ids as a list: generation_config first, then the model config."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# --------------------------------------------------------------------------
# make
# --------------------------------------------------------------------------

@torch.no_grad()
def reinit_(model, std, seed):
    """Overwrite every parameter with non-trivial random values so that
    comparisons cannot pass by accident (e.g. all-ones norms, zero biases)."""
    gen = torch.Generator().manual_seed(seed + 1)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))

        def randn(scale, shape=p.shape):
            return scale * torch.randn(shape, generator=gen,
                                       dtype=torch.float32)

        if "norm" in name:  # input/post_attention/final RMSNorm weights
            val = 1.0 + randn(0.3)
        elif name.endswith(".bias"):  # q/k/v projections carry biases
            val = randn(0.5)
        else:  # embeddings, lm_head, projection matrices
            val = randn(std)
        p.copy_(val.to(p.dtype))


def cmd_make(args):
    eos = args.eos_id if args.eos_id is not None else [args.vocab - 1]
    bos = args.bos_id if args.bos_id is not None else args.vocab - 2
    pad = args.pad_id if args.pad_id is not None else eos[0]
    for tok in eos + [bos, pad]:
        if not 0 <= tok < args.vocab:
            sys.exit(f"special token id {tok} outside vocab {args.vocab}")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        sys.exit("need heads % kv_heads == 0 and hidden % heads == 0")

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        hidden_act="silu",
        max_position_embeddings=args.max_pos,
        rms_norm_eps=1e-6,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tied,
        use_sliding_window=False,
        use_cache=True,
        bos_token_id=bos,
        eos_token_id=eos[0],
        pad_token_id=pad,
    )
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    reinit_(model, args.init_std, args.seed)
    if args.tied:
        assert model.lm_head.weight.data_ptr() == \
            model.model.embed_tokens.weight.data_ptr()
    model = model.to(DTYPES[args.dtype]).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=pad,
    )

    os.makedirs(args.out, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if args.shard_size is not None:
        kwargs["max_shard_size"] = args.shard_size
    try:
        model.save_pretrained(args.out, **kwargs)
    except TypeError:  # newer versions dropped the (always-on) flag
        kwargs.pop("safe_serialization")
        model.save_pretrained(args.out, **kwargs)

    if args.legacy_config:
        # Rewrite config.json the way hub Qwen2 checkpoints (transformers 4.x)
        # spell it: top-level rope_theta and torch_dtype.
        cfg_path = os.path.join(args.out, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.get("rope_theta", args.rope_theta)
        cfg["torch_dtype"] = cfg.pop("dtype", args.dtype)
        cfg.pop("layer_types", None)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    files = sorted(os.listdir(args.out))
    print(json.dumps({"out": args.out, "files": files,
                      "num_parameters": sum(p.numel() for p in
                                            model.parameters()),
                      "eos_token_id": eos, "bos_token_id": bos,
                      "pad_token_id": pad}))


# --------------------------------------------------------------------------
# logprobs / greedy
# --------------------------------------------------------------------------

@torch.inference_mode()
def cmd_logprobs(args):
    model = load_model(args.model, DTYPES[args.dtype], args.attn)
    rows = []
    for row in read_jsonl(args.input):
        ids = [int(i) for i in row["input_ids"]]
        if len(ids) < 2:
            rows.append({"logprobs": []})
            continue
        x = torch.tensor([ids], dtype=torch.long)
        logits = model(input_ids=x, use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = x[0, 1:].unsqueeze(-1)
        vals = lp.gather(-1, tgt).squeeze(-1)
        rows.append({"logprobs": [float(v) for v in vals.tolist()]})
    write_jsonl(args.output, rows)
    print(json.dumps({"sequences": len(rows), "output": args.output}))


@torch.inference_mode()
def cmd_greedy(args):
    model = load_model(args.model, DTYPES[args.dtype], args.attn)
    eos = eos_ids(model)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    rows = []
    for row in read_jsonl(args.input):
        ids = [int(i) for i in row["input_ids"]]
        x = torch.tensor([ids], dtype=torch.long)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            num_beams=1,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=0,
            eos_token_id=eos or None,
            pad_token_id=pad,
            temperature=None, top_p=None, top_k=None,
            repetition_penalty=None,
        )
        new = [int(t) for t in out[0, len(ids):].tolist()]
        for i, t in enumerate(new):  # stop after the first EOS (inclusive)
            if t in eos:
                new = new[:i + 1]
                break
        rows.append({"output_ids": new})
    write_jsonl(args.output, rows)
    print(json.dumps({"sequences": len(rows), "eos_token_id": eos,
                      "output": args.output}))


# --------------------------------------------------------------------------
# tokenizer: chat / encode / make-tokenizer
# --------------------------------------------------------------------------

def cmd_chat(args):
    tok = load_tokenizer(args.tokenizer)
    rows = []
    for row in read_jsonl(args.input):
        msgs = row["messages"]
        agp = bool(row.get("add_generation_prompt", False))
        extra = row.get("kwargs", {})
        text = tok.apply_chat_template(msgs, tokenize=False,
                                       add_generation_prompt=agp, **extra)
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False,
                                      add_generation_prompt=agp, **extra)
        rows.append({"text": text, "ids": as_id_list(ids)})
    write_jsonl(args.output, rows)
    print(json.dumps({"rows": len(rows), "output": args.output}))


def cmd_encode(args):
    tok = load_tokenizer(args.tokenizer)
    rows = []
    for row in read_jsonl(args.input):
        # {"text": ...} is encoded and decoded again; {"ids": [...]} is only decoded (ids
        # may lie past the tokenizer, in a padded embedding's rows).
        if "ids" in row:
            ids = [int(i) for i in row["ids"]]
        else:
            ids = tok(row["text"], add_special_tokens=False)["input_ids"]
            ids = [int(i) for i in ids]
        rows.append({"ids": ids,
                     "decoded": tok.decode(ids, skip_special_tokens=False)})
    write_jsonl(args.output, rows)
    print(json.dumps({"rows": len(rows), "output": args.output}))


def training_corpus():
    """Fixed local text for training a toy BPE (no downloads, and nothing
    that changes with library versions, so the tokenizer is reproducible)."""
    import this  # noqa: F401  (prints the Zen of Python to stdout)
    zen = "".join(this.d.get(c, c) for c in this.s)
    return [
        zen,
        QWEN2_CHAT_TEMPLATE,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello there! What is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n",
        "The quick brown fox jumps over the lazy dog. " * 3,
        "def main():\n    return 0\n\nif __name__ == '__main__':\n"
        "    main()\n",
        "Hello, world! 你好，世界。 Привет, мир! 1234567890 ünïcödé",
    ]


def cmd_make_tokenizer(args):
    import contextlib
    import io
    from tokenizers import (Regex, Tokenizer, decoders, models,
                            normalizers, pre_tokenizers, trainers)
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None, fuse_unk=False,
                              byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[])
    with contextlib.redirect_stdout(io.StringIO()):
        corpus = training_corpus()
    tk.train_from_iterator(corpus, trainer=trainer)
    tk.add_special_tokens(specials)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        clean_up_tokenization_spaces=False, model_max_length=32768)
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    os.makedirs(args.out, exist_ok=True)
    fast.save_pretrained(args.out)
    # transformers 5 writes the template to chat_template.jinja only; hub
    # Qwen2 checkpoints carry it inside tokenizer_config.json.  Write both so
    # either loader convention is exercised.
    cfg_path = os.path.join(args.out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = QWEN2_CHAT_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    vocab = tk.get_vocab(with_added_tokens=True)
    print(json.dumps({"out": args.out, "vocab_size": len(vocab),
                      "special_ids": {s: vocab[s] for s in specials},
                      "files": sorted(os.listdir(args.out))}))


# --------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------

def load_with_info(path):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True,
        output_loading_info=True)
    info = {k: sorted(v) for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    return model, info


@torch.inference_mode()
def cmd_compare(args):
    a, info_a = load_with_info(args.model)
    b, info_b = load_with_info(args.other)
    sa, sb = a.state_dict(), b.state_dict()
    missing = sorted(set(sa) ^ set(sb))
    equal = not missing
    max_diff = 0.0
    differing = []
    for k in sorted(set(sa) & set(sb)):
        ta, tb = sa[k], sb[k]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            equal = False
            differing.append(k)
            max_diff = float("inf")
            continue
        if not torch.equal(ta, tb):
            equal = False
            differing.append(k)
            d = (ta.float() - tb.float()).abs().max().item()
            max_diff = max(max_diff, d)
    for info in (info_a, info_b):
        if any(info.values()):  # keys transformers had to init randomly
            equal = False
    cfg_keys = ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings")
    cfg_diff = {k: [getattr(a.config, k, None), getattr(b.config, k, None)]
                for k in cfg_keys
                if getattr(a.config, k, None) != getattr(b.config, k, None)}
    if cfg_diff:
        equal = False
    print(json.dumps({"equal": equal, "max_abs_diff": max_diff,
                      "missing": missing, "differing": differing,
                      "config_diff": cfg_diff,
                      "loading_info": {"model": info_a, "other": info_b},
                      "num_tensors": len(sa)}))
    return 0 if equal else 1


# --------------------------------------------------------------------------
# load-dir
# --------------------------------------------------------------------------

def cmd_load_dir(args):
    """Loads a saved model directory the way a user would, with no extra argument: the
    tokenizer (and its chat template), the model and the generation config."""
    tokenizer = load_tokenizer(args.dir)
    messages = json.loads(args.messages)
    chat = tokenizer.apply_chat_template(messages, tokenize=True,
                                         add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(args.dir, local_files_only=True)
    generation = GenerationConfig.from_pretrained(args.dir, local_files_only=True)

    def ids(x):
        return [] if x is None else [int(x)] if isinstance(x, int) else [int(i) for i in x]
    print(json.dumps({
        "chat_ids": as_id_list(chat),
        "generation_eos": ids(generation.eos_token_id),
        "config_eos": ids(model.config.eos_token_id),
        "parameters": sum(p.numel() for p in model.parameters()),
    }))
    return 0


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make", help="save a random tiny Qwen2 checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--vocab", type=int, default=300)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--intermediate", type=int, default=128)
    tie = m.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true")
    tie.add_argument("--untied", dest="tied", action="store_false")
    m.set_defaults(tied=False)
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--max-pos", type=int, default=512)
    m.add_argument("--dtype", choices=["float32", "bfloat16"],
                   default="float32")
    m.add_argument("--shard-size", type=int, default=None,
                   help="max shard size in bytes (writes an index + shards)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--bos-id", type=int, default=None,
                   help="default vocab-2")
    m.add_argument("--eos-id", type=int, nargs="+", default=None,
                   help="default vocab-1; several ids -> generation_config "
                        "gets the list, config.json the first")
    m.add_argument("--pad-id", type=int, default=None,
                   help="default: first eos id")
    m.add_argument("--init-std", type=float, default=0.2,
                   help="std of the random matrices (embeddings, projections)")
    m.add_argument("--legacy-config", action="store_true",
                   help="write config.json with top-level rope_theta / "
                        "torch_dtype like transformers 4.x hub checkpoints")
    m.set_defaults(func=cmd_make)

    for name, func, help_ in (
            ("logprobs", cmd_logprobs, "next-token log-probs (f32)"),
            ("greedy", cmd_greedy, "greedy generate, new tokens only")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", required=True)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--dtype", choices=list(DTYPES), default="float32")
        s.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
        if name == "greedy":
            s.add_argument("--max-new-tokens", type=int, required=True)
        s.set_defaults(func=func)

    for name, func in (("chat", cmd_chat), ("encode", cmd_encode)):
        s = sub.add_parser(name)
        s.add_argument("--tokenizer", required=True)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.set_defaults(func=func)

    t = sub.add_parser("make-tokenizer",
                       help="train a toy byte-level BPE with Qwen2 specials")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=400)
    t.set_defaults(func=cmd_make_tokenizer)

    c = sub.add_parser("compare", help="bitwise-compare two checkpoints")
    c.add_argument("--model", required=True)
    c.add_argument("--other", required=True)
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("load-dir", help="load a saved directory with transformers")
    d.add_argument("--dir", required=True)
    d.add_argument("--messages", required=True, help="chat messages as JSON")
    d.set_defaults(func=cmd_load_dir)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
