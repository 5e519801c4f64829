"""eval.generate and eval.nll against independent references: one-at-a-time `model.generate`
and the model's own teacher-forced loss, on tiny LLaMA models in float64 (no near-ties)."""

from collections import Counter

import pytest
import torch
from conftest import make_tiny_llama

from eval.generate import EOS, LENGTH, batch_order, cache_keyword, eos_token_ids, generate
from eval.nll import aggregate, reference_nll
from qdiablo.data import MathRecord, encode_example, reference_response

TEXTS = [
    "What is 2 + 3?",
    "a",
    "Tom has 4 apples and buys 7 more. How many apples does he have now?",
    "12 * 12 =",
    "Sum the numbers 1, 2, 3 and 4.",
    "Why?",
]


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(seed=3, dtype=torch.float64, init_range=0.2)


def hf_one_at_a_time(model, prompts, max_new_tokens, eos=None, num_beams=1):
    """The reference: `model.generate` on each prompt alone, without padding."""
    outs = []
    for p in prompts:
        x = torch.tensor([p])
        with torch.no_grad():
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                eos_token_id=eos,
                pad_token_id=0,
            )
        new = y[0, len(p) :].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        outs.append(new)
    return outs


def test_batched_greedy_equals_unbatched_greedy(model64, tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    free = hf_one_at_a_time(model64, prompts, 24)
    # An EOS that some rows emit early and others late or never, so rows leave the batch at
    # different steps.
    counts = Counter(t for out in free for t in out[:12])
    eos = counts.most_common(1)[0][0]
    ref = hf_one_at_a_time(model64, prompts, 24, eos=eos)
    lengths = [len(r) for r in ref]
    assert len(set(lengths)) >= 3 and max(lengths) == 24 and min(lengths) < 12, lengths
    for batch_size in (1, 4, len(prompts)):
        got = generate(
            model64,
            prompts,
            eos_token_ids=[eos],
            pad_token_id=0,
            max_new_tokens=24,
            batch_size=batch_size,
            progress=False,
        )
        assert [g.index for g in got] == list(range(len(prompts)))
        assert [g.token_ids for g in got] == ref
        assert [g.stopped for g in got] == [EOS if n < 24 else LENGTH for n in lengths]


def test_batched_beam_search_equals_unbatched(model64, tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:4]]
    ref = hf_one_at_a_time(model64, prompts, 10, eos=2, num_beams=3)
    got = generate(
        model64,
        prompts,
        eos_token_ids=[2],
        pad_token_id=0,
        max_new_tokens=10,
        num_beams=3,
        batch_size=4,
        progress=False,
    )
    assert [g.token_ids for g in got] == ref


def test_batches_are_length_sorted_and_cover_everything():
    prompts = [[1] * n for n in (3, 9, 1, 7, 7, 2)]
    batches = batch_order(prompts, 4)
    assert batches == [[1, 3, 4, 0], [5, 2]]
    with pytest.raises(ValueError):
        batch_order(prompts, 0)


def test_eos_ids_merge_model_and_tokenizer(tiny_llama, tokenizer):
    tiny_llama.generation_config.eos_token_id = [2, 4]
    assert eos_token_ids(tiny_llama, tokenizer) == [2, 4]


def test_generation_leaves_the_model_as_it_was(model64, tokenizer):
    model64.train()
    generate(
        model64,
        [tokenizer("hi")["input_ids"]],
        eos_token_ids=[2],
        pad_token_id=0,
        max_new_tokens=2,
        progress=False,
    )
    assert model64.training
    model64.eval()


# --------------------------------------------------------------------------------------------
# Reference-response NLL
# --------------------------------------------------------------------------------------------

RECORDS = [
    MathRecord("What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "5"),
    MathRecord("Nicole has 3 caterpillars and finds 2 more. How many?", "", "5.0"),  # mawps
    MathRecord("Pick one.", "\nRationale: it is C. The answer is (C).", "C"),
    MathRecord("x", "A very long reference response " * 6, "1"),
]


def test_reference_response_falls_back_to_the_answer_sentence():
    assert reference_response(RECORDS[0]) == "2 + 3 = 5. The answer is 5."
    assert reference_response(RECORDS[1]) == "The answer is 5."
    assert reference_response(RECORDS[2]) == "Rationale: it is C. The answer is (C)."
    assert reference_response(RECORDS[0], "answer") == "The answer is 5."


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-7), (torch.float32, 2e-5)])
def test_nll_equals_the_models_own_loss(tokenizer, template, dtype, tol):
    model = make_tiny_llama(seed=1, dtype=dtype, init_range=0.1)
    got = reference_nll(model, tokenizer, RECORDS, template=template, batch_size=3, progress=False)
    for record, item in zip(RECORDS, got):
        ex = encode_example(
            tokenizer, record, template, max_length=4096, response=reference_response(record)
        )
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([ex["labels"]])).loss.item()
        n = sum(label != -100 for label in ex["labels"])
        assert item.tokens == n
        assert item.mean == pytest.approx(loss, rel=tol, abs=tol)
    agg = aggregate(got)
    assert agg["tokens"] == sum(i.tokens for i in got)
    assert agg["nll"] == pytest.approx(sum(i.nll_sum for i in got) / agg["tokens"])
    assert agg["ppl"] == pytest.approx(torch.tensor(agg["nll"]).exp().item())


def test_nll_does_not_depend_on_batching(tokenizer):
    model = make_tiny_llama(seed=2, dtype=torch.float64)
    one = reference_nll(model, tokenizer, RECORDS, template="alpaca", batch_size=1, progress=False)
    many = reference_nll(model, tokenizer, RECORDS, template="alpaca", batch_size=4, progress=False)
    assert [a.tokens for a in one] == [b.tokens for b in many]
    for a, b in zip(one, many):
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-10)


def test_nll_is_accurate_in_float32_with_a_large_vocabulary(tokenizer):
    """Peaked float32 logits over a 49k vocabulary: the NLL must match a float64 log-softmax of the
    same logits (float32 cross-entropies lose up to ~5e-5 nats per token here)."""
    model = make_tiny_llama(seed=4, vocab=49152)
    with torch.no_grad():  # a real LM's shape: a few likely tokens, a long tail of unlikely ones
        model.lm_head.weight[:261] *= 30
        model.lm_head.weight[261:] = 0
    got = reference_nll(model, tokenizer, RECORDS[:2], template="alpaca", progress=False)
    for record, item in zip(RECORDS[:2], got):
        ex = encode_example(tokenizer, record, response=reference_response(record))
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        scored = torch.tensor(ex["labels"][1:]) != -100
        logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        assert item.mean == pytest.approx(-logp[scored].mean().item(), abs=1e-6)


def test_kv_cache_argument_follows_the_model_signature(model64, tokenizer):
    """The cache goes in by the name the installed transformers' forward takes, so neither a
    release without `cache` nor one without `past_key_values` breaks generation."""
    import inspect
    import warnings

    from qdiablo import DiaBloConfig, get_diablo_model

    expected = "cache" if "cache" in inspect.signature(model64.forward).parameters else None
    assert cache_keyword(model64) == (expected or "past_key_values")
    wrapped = get_diablo_model(make_tiny_llama(seed=3, dtype=torch.float64), DiaBloConfig(4))
    assert cache_keyword(wrapped) == cache_keyword(model64)  # read through the wrapper

    class OlderForward(torch.nn.Module):  # the signature of transformers before `cache`
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(OlderForward()) == "past_key_values"
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated")
        got = generate(
            model64, prompts, eos_token_ids=[], pad_token_id=0, max_new_tokens=4, progress=False
        )
    assert [g.token_ids for g in got] == hf_one_at_a_time(model64, prompts, 4)
