"""Instruction data: Alpaca template, labels on the response only, the truncation policy, bad records, client split."""

import json

import pytest
import torch
import torch.nn.functional as F

from chainfed_core import instruct
from chainfed_core.backbone import IGNORE_INDEX, from_model
from tiny_text import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"instruction": "Add.", "input": "1 2", "output": "3"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
]


def test_alpaca_template_with_and_without_input():
    assert instruct.alpaca_prompt(RECORDS[0]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    assert instruct.alpaca_prompt(RECORDS[1]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_labels_are_the_response_and_its_end_token_only():
    tok = tiny_tokenizer()
    out = instruct.tokenize_records(RECORDS, tok, max_length=512)
    assert out.skipped == [] and out.truncated == [] and len(out.dataset) == 2
    row = out.dataset[1]
    prompt_len = len(instruct.alpaca_prompt(RECORDS[1]).encode())       # one token per byte
    response = tok("hi there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(row["input_ids"]) == prompt_len + len("hi there") + 1
    assert row["lm_labels"] == [IGNORE_INDEX] * prompt_len + response
    assert row["input_ids"][prompt_len:] == response
    assert tok.decode(row["input_ids"][:prompt_len]) == instruct.alpaca_prompt(RECORDS[1])


def test_a_bos_from_the_tokenizer_is_part_of_the_prompt():
    tok = tiny_tokenizer(bos=True)
    row = instruct.tokenize_records(RECORDS[:1], tok, max_length=512).dataset[0]
    assert row["input_ids"][0] == tok.bos_token_id and row["lm_labels"][0] == IGNORE_INDEX
    assert sum(lab != IGNORE_INDEX for lab in row["lm_labels"]) == len("3") + 1


def test_padding_is_ignored_even_where_pad_is_the_end_token():
    tok = tiny_tokenizer()
    out = instruct.tokenize_records(RECORDS, tok, max_length=512)
    batch = next(instruct.batches(out.dataset, 2, shuffle=False, pad_id=tok.eos_token_id))   # SmolLM2 pads with </s>
    assert set(batch) == {"input_ids", "attention_mask", "lm_labels"}
    lengths = [len(r) for r in out.dataset["input_ids"]]
    assert batch["input_ids"].shape == batch["lm_labels"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert (batch["lm_labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert batch["lm_labels"][short, min(lengths) - 1] == tok.eos_token_id                  # the real end is kept
    assert (batch["lm_labels"] != IGNORE_INDEX).sum() == len("3") + 1 + len("hi there") + 1


def test_backbone_loss_is_the_mean_over_response_tokens():
    tok = tiny_tokenizer()
    model = tiny_llama()
    out = instruct.tokenize_records(RECORDS, tok, max_length=512)
    batch = next(instruct.batches(out.dataset, 2, shuffle=False, pad_id=tok.pad_token_id))
    backbone = from_model(model, "llama")
    with torch.no_grad():
        hidden, ctx = backbone.embed(batch)
        hidden = backbone.run_layers(range(backbone.num_layers), hidden, ctx)
        loss, _ = backbone.head_loss(hidden, batch, ctx)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []                                      # by hand: -log p(token t | tokens < t) on response tokens
    for b in range(2):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["lm_labels"][b, t] != IGNORE_INDEX:
                terms.append(-F.log_softmax(logits[b, t - 1], -1)[batch["lm_labels"][b, t]])
    assert len(terms) == 2 + 9
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_truncation_policy_skips_long_prompts_and_cuts_long_responses():
    tok = tiny_tokenizer()
    prompt_len = len(instruct.alpaca_prompt(RECORDS[1]).encode())
    out = instruct.tokenize_records(RECORDS, tok, max_length=prompt_len + 3)
    # record 0's prompt is longer than record 1's and fills max_length: skipped and counted
    assert len(instruct.alpaca_prompt(RECORDS[0]).encode()) >= prompt_len + 3
    assert out.skipped == [0] and out.truncated == [1]
    assert out.dataset["record"] == [1] and len(out.dataset[0]["input_ids"]) == prompt_len + 3
    assert out.dataset[0]["lm_labels"][-3:] == tok("hi ", add_special_tokens=False)["input_ids"]
    assert "1 skipped" in out.report() and "1 responses truncated" in out.report()


@pytest.mark.parametrize("bad, field", [({"input": "x", "output": "y"}, "instruction"),
                                        ({"instruction": "x", "output": "  "}, "output"),
                                        ({"instruction": "x"}, "output")])
def test_a_record_without_instruction_or_output_is_an_error_naming_it(tmp_path, bad, field):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS + [bad]))
    with pytest.raises(instruct.InstructDataError, match=rf"record 2 has no '{field}'"):
        instruct.load_alpaca(path)
    with pytest.raises(instruct.InstructDataError, match="record 2"):
        instruct.tokenize_records(RECORDS + [bad], tiny_tokenizer(), max_length=64)


def test_chat_template_prompt_is_masked_too():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert instruct.chat_prompt(RECORDS[0], tok) == "<|user|>Add.\n\n1 2\n<|assistant|>"
    row = instruct.tokenize_records(RECORDS[:1], tok, max_length=64, template="chat").dataset[0]
    assert row["lm_labels"].count(IGNORE_INDEX) == len("<|user|>Add.\n\n1 2\n<|assistant|>")
    with pytest.raises(ValueError, match="template: 'vicuna'"):
        instruct.tokenize_records(RECORDS, tok, max_length=64, template="vicuna")


def test_split_over_clients_is_iid_seeded_and_complete():
    tok = tiny_tokenizer()
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(45)]
    data = instruct.tokenize_records(records, tok, max_length=512).dataset
    clients = instruct.split_clients(data, 20, seed=3)
    assert [len(c) for c in clients] == [3] * 5 + [2] * 15
    assert sorted(r for c in clients for r in c["record"]) == list(range(45))
    assert [c["record"] for c in clients] == [c["record"] for c in instruct.split_clients(data, 20, seed=3)]
    assert [c["record"] for c in clients] != [c["record"] for c in instruct.split_clients(data, 20, seed=4)]
    with pytest.raises(ValueError, match="num_clients"):
        instruct.split_clients(data, 46)
