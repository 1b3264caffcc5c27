"""Tiny in-process models and tokenizers for tests: no downloads, seconds to build."""
from __future__ import annotations

import random

import torch

from malmen.facts import Fact
from malmen.models import prepare

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue black white paris rome oslo lima cairo tokyo what is the "
         "capital of who wrote which city country river born in plays for speaks language team nq question "
         "a an and or by").split()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(200):
        vocab.setdefault(f"w{i}", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def llama(layers: int = 4, hidden: int = 32, inter: int = 64, seed: int = 0, dtype=torch.float32, init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer()), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=init, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return prepare(LlamaForCausalLM(config).to(dtype))


def gpt2(layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer()), n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return prepare(GPT2LMHeadModel(config))


def facts(n: int, seed: int = 0) -> list[Fact]:
    """Synthetic facts: subject words w0..w199 mapped to random answers, with a rephrase template."""
    rng = random.Random(seed)
    answers = WORDS[:30]
    out = []
    for i in range(n):
        subject = f"w{rng.randrange(200)}"
        target = " ".join(rng.sample(answers, 2))
        out.append(Fact(prompt=f"what is the capital of {subject}", target=target,
                        rephrases=(f"which city is capital of {subject}",),
                        locality_prompt=f"nq question who wrote w{rng.randrange(200)}",
                        locality_answer=rng.choice(answers), uid=str(i)))
    return out


def write_facts(path, facts_list) -> None:
    """Write facts as a JSONL file of our own format."""
    import json

    with open(path, "w") as f:
        for fact in facts_list:
            f.write(json.dumps({"prompt": fact.prompt, "target": fact.target, "rephrases": list(fact.rephrases),
                                "locality_prompt": fact.locality_prompt, "locality_answer": fact.locality_answer}) + "\n")


def write_model(path) -> None:
    """Save a tiny Llama and its tokenizer as a Hugging Face directory (``--model path``)."""
    model, tok = llama(layers=3, hidden=32, inter=128), tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)


def gptj(layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    n = len(tokenizer())
    config = GPTJConfig(vocab_size=n, n_embd=hidden, n_layer=layers, n_head=4, rotary_dim=8, n_positions=64,
                        bos_token_id=2, eos_token_id=2)
    return prepare(GPTJForCausalLM(config))


def neox(layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * hidden, max_position_embeddings=64, bos_token_id=2, eos_token_id=2)
    return prepare(GPTNeoXForCausalLM(config))


def t5(layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer()), d_model=hidden, d_ff=2 * hidden, d_kv=8, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    return prepare(T5ForConditionalGeneration(config))


def bert(layers: int = 3, hidden: int = 32, seed: int = 0, num_labels: int = 1):
    """A BERT claim classifier: one verdict logit on the first token."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    return prepare(BertForSequenceClassification(config))


def claims(n: int, seed: int = 0) -> list[Fact]:
    """Synthetic fact-checking edits: a claim, its rephrase, an unrelated claim; targets are verdicts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        subject, city = f"w{rng.randrange(200)}", rng.choice(WORDS[30:36])
        out.append(Fact(prompt=f"the capital of {subject} is {city}", target=rng.choice(("SUPPORTS", "REFUTES")),
                        rephrases=(f"{subject} capital city is {city}",),
                        locality_prompt=f"w{rng.randrange(200)} plays for {rng.choice(WORDS[:20])}",
                        locality_answer=rng.choice(("SUPPORTS", "REFUTES")), uid=str(i)))
    return out


def write_encoder(path, layers: int = 2, hidden: int = 32) -> None:
    """Save a tiny BERT encoder (no head) and its tokenizer, like a sentence-embedding checkpoint."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # a large init scale makes the first token's output depend on the rest of the claim
    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0, initializer_range=0.5)
    BertModel(config).save_pretrained(path)
    tokenizer().save_pretrained(path)


def causal(family: str, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A tiny decoder-only LM of a family whose logits are processed after the head: Granite
    (divided by ``logits_scaling``), Cohere (times ``logit_scale``), Gemma 2 (final soft-capping)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=2, eos_token_id=2, initializer_range=0.5)
    configs = {
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, {"logits_scaling": 8.0}),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.0625}),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   {"final_logit_softcapping": 0.5, "head_dim": 8, "attn_implementation": "eager"}),
    }
    config_cls, model_cls, extra = configs[family]
    return prepare(model_cls(config_cls(**common, **extra)))


def meta_gradients(editor, facts_list, **config):
    """The hyper-network's meta-gradients on ``facts_list`` under ``TrainConfig(**config)`` (one
    step, no step-size search), and the trainer; the editor is left as it was found."""
    from malmen.train import TrainConfig, Trainer

    hn = editor.hypernet
    state = {k: v.clone() for k, v in hn.state_dict().items()}
    trainer = Trainer(editor, facts_list, facts_list, TrainConfig(n_edits=len(facts_list), calibrate_eta=False, **config),
                      "/unused")
    trainer.meta_gradients(facts_list, 0)
    grads = {n: p.grad.clone() for n, p in hn.named_parameters() if p.grad is not None}
    hn.zero_grad(set_to_none=True)
    hn.load_state_dict(state)
    return grads, trainer
