"""A real Hugging Face causal LM (transformers' LlamaForCausalLM, tiny and randomly initialised) whose head and
loss go through fused_train's linear_cross_entropy, against the model's own loss (its logits, then
transformers' ForCausalLMLoss: labels shifted left, -100 ignored, mean over the kept tokens)."""

import pytest
import torch

from conftest import assert_close_scaled
from fused_train.nn.functional import linear_cross_entropy

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32, tie_word_embeddings=True):
    config = transformers.LlamaConfig(
        vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def batch(vocab_size, batch_size=3, length=20):
    """Token ids with right padding (masked, labels -100), as a collator makes them."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def fused_lm_loss(model, input_ids, attention_mask, labels):
    """The model's body, then its lm_head and loss in one: the logits never exist."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return linear_cross_entropy(hidden, model.lm_head.weight, shifted)


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_loss_and_every_gradient_match_the_models_own_loss(tie_word_embeddings):
    model = tiny_llama(tie_word_embeddings=tie_word_embeddings)
    input_ids, attention_mask, labels = batch(model.config.vocab_size)
    ours, our_grads = loss_and_grads(model, lambda: fused_lm_loss(model, input_ids, attention_mask, labels))
    theirs, their_grads = loss_and_grads(
        model, lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        assert_close_scaled(our_grads[name], their_grads[name], torch.float32)


def test_training_steps_follow_the_same_loss_curve():
    """Ten AdamW steps each way from the same weights: the same losses, the same weights at the end."""
    curves, finals = [], []
    for use_fused in (True, False):
        model = tiny_llama()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        input_ids, attention_mask, labels = batch(model.config.vocab_size)
        curve = []
        for _ in range(10):
            optimizer.zero_grad()
            if use_fused:
                loss = fused_lm_loss(model, input_ids, attention_mask, labels)
            else:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert curves[0][-1] < curves[0][0] - 0.5  # it learns (the batch is seen again and again)
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-3, atol=1e-4)


def test_bf16_model_matches_within_bf16_rounding():
    """A bf16 model: the model's own loss rounds its logits to bf16 before an fp32 loss; ours computes them in
    fp32 and rounds the loss and each gradient once. They agree to bf16's tolerance."""
    model = tiny_llama(torch.bfloat16)
    input_ids, attention_mask, labels = batch(model.config.vocab_size)
    ours, our_grads = loss_and_grads(model, lambda: fused_lm_loss(model, input_ids, attention_mask, labels))
    theirs, their_grads = loss_and_grads(
        model, lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
    assert ours.dtype == torch.bfloat16
    assert_close_scaled(ours.float(), theirs.float(), torch.bfloat16)
    for name in our_grads:
        assert_close_scaled(our_grads[name].float(), their_grads[name].float(), torch.bfloat16)
