"""Build a small random-weight model and a BPE tokenizer locally (no model hub).

    python tests/vllm/tiny_model.py OUT_DIR [--arch llama|deepseek_v2|gemma2] [--layers 2]
        [--hidden 256] [--heads 4] [--kv-heads 2]

Prefill cost grows with --layers/--hidden, so timing tests use a larger model. Each
architecture uses its real config class, so vLLM picks the attention it would for the
real model: ``deepseek_v2`` is MLA (one latent KV tensor per layer; vLLM's CPU MLA kernel
needs a 512 + 64 latent), ``gemma2`` alternates sliding-window and full attention layers
(two KV cache groups under vLLM's hybrid KV cache manager).
"""

from __future__ import annotations

import argparse
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    rnd = random.Random(1234)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rnd.choice(letters) for _ in range(rnd.randint(2, 8))) for _ in range(4000)]
    corpus = [" ".join(rnd.choice(words) for _ in range(60)) for _ in range(3000)]
    corpus.append("".join(chr(c) for c in range(32, 127)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>", "<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config: PretrainedConfig
    if args.arch == "deepseek_v2":
        # MLA: the cached latent is kv_lora_rank + qk_rope_head_dim = 576 wide (the only
        # width vLLM's CPU MLA decode kernel is built for); no MoE (first_k_dense_replace).
        config = DeepseekV2Config(
            **common,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            first_k_dense_replace=args.layers,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=args.hidden,
        )
        return DeepseekV2ForCausalLM(config)
    if args.arch == "gemma2":
        config = Gemma2Config(
            **common, head_dim=64, sliding_window=args.sliding_window, query_pre_attn_scalar=64
        )
        return Gemma2ForCausalLM(config)
    config = LlamaConfig(**common, head_dim=64)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--arch", choices=("llama", "deepseek_v2", "gemma2"), default="llama")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--sliding-window", type=int, default=256)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.vocab)
    tokenizer.save_pretrained(args.out)
    torch.manual_seed(0)
    build_model(args, tokenizer).to(torch.bfloat16).save_pretrained(args.out)


if __name__ == "__main__":
    main()
