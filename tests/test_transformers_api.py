"""Senri as a transformers model: config defaults, output options, generation modes, export, checkpointing, loading."""

from __future__ import annotations

import torch

from senri import SenriCache
from tests.conftest import tiny_model


def test_use_cache_none_follows_the_config_and_generate_continues_from_a_returned_cache():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert isinstance(model(input_ids=ids).cache, SenriCache)  # config.use_cache is True
        assert model(input_ids=ids, use_cache=False).cache is None
        model.config.use_cache = False
        assert model(input_ids=ids).cache is None
        model.config.use_cache = True
    whole = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = first.cache
    assert isinstance(cache, SenriCache) and cache.seen_tokens == 34  # the last token is not fed yet
    again = model.generate(first.sequences, cache=cache, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(again, whole)
    # inputs_embeds: generate returns the new tokens only, the same ones.
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(from_embeds, whole[:, 30:])


def test_hidden_states_attentions_and_tuples_come_back_in_the_documented_shapes():
    layer_types = ["sliding_attention", "memory", "memory_only", "full_attention"]
    model = tiny_model(num_hidden_layers=4, layer_types=layer_types, num_sink_tokens=2)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids)
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=1e-5)  # the explicit path computes the same
    assert plain.hidden_states is None and plain.attentions is None
    assert len(out.hidden_states) == 5 and all(h.shape == (2, 45, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    assert len(out.attentions) == 4 and all(a.shape == (2, 4, 45, 45) for a in out.attentions)
    sliding, memory, memory_only, full = out.attentions
    assert not memory_only.any()  # no softmax path
    q, k = torch.arange(45)[:, None], torch.arange(45)[None]
    window = (k <= q) & ((k >= (q // 4 - 4) * 4) | (k < 2))  # chunk 4, window 16, two sinks
    for weights, visible in ((sliding, window), (memory, window), (full, k <= q)):
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 45))
        assert not weights[..., ~visible].any() and (weights[..., visible] > 0).all()

    # Streaming: the key axis covers every position seen so far.
    cache = SenriCache(model.config, batch_size=2)
    with torch.no_grad():
        model(input_ids=ids[:, :30], cache=cache)
        tail = model(input_ids=ids[:, 30:], cache=cache, output_attentions=True)
    assert all(a.shape == (2, 4, 15, 45) for a in tail.attentions)
    torch.testing.assert_close(tail.attentions[0], sliding[:, :, 30:], rtol=0, atol=1e-5)

    with torch.no_grad():
        as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
        base = model.model(input_ids=ids, return_dict=False, use_cache=False, output_hidden_states=True)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0 and torch.equal(as_tuple[1], plain.logits)
    assert isinstance(as_tuple[2], SenriCache)
    assert isinstance(base, tuple) and len(base) == 2 and base[0].shape == (2, 45, 32) and len(base[1]) == 5


def test_assisted_and_prompt_lookup_decoding_are_refused_by_generate_as_for_any_stateful_model():
    import pytest

    model = tiny_model()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    for kwargs in (dict(assistant_model=tiny_model(seed=1)), dict(prompt_lookup_num_tokens=3)):
        # transformers < 5.25 refuses any `_is_stateful` model; from 5.25 it refuses a cache that cannot be cropped.
        refusal = ("assisted generation is not supported with stateful models"
                   "|Assisted decoding requires a cache that can be cropped")
        with pytest.raises(ValueError, match=refusal):
            model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs)
    # Plain greedy decoding is unaffected.
    assert model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (1, 25)


def test_an_invalid_config_assignment_is_refused_naming_the_key_and_changes_nothing():
    import pytest

    from senri import SenriConfig, SenriForCausalLM
    from tests.conftest import tiny_config

    config = tiny_config()
    with pytest.raises(ValueError, match=r"sliding_window = -2 is refused: sliding_window must be a non-negative "
                                         r"integer \(rounded up to whole chunks of 4\), got -2"):
        config.sliding_window = -2
    assert config.sliding_window == 16
    for key, value in (("num_sink_tokens", 9), ("memory_type", "mutli"), ("layer_types", ["memory"]),
                       ("num_hidden_layers", 4), ("chunk_size", 0)):
        with pytest.raises(ValueError, match=f"setting {key} = "):
            setattr(config, key, value)
    assert config.to_dict() == tiny_config().to_dict()
    # Fields that must change together: update() checks them once, all or nothing.
    config.update({"chunk_size": 8, "sliding_window": 24})
    assert (config.chunk_size, config.sliding_window) == (8, 24)
    with pytest.raises(ValueError, match="sliding_window = -20"):
        config.update({"chunk_size": 16, "sliding_window": -20})
    assert (config.chunk_size, config.sliding_window) == (8, 24)
    config.sliding_window = 32  # a valid assignment goes through
    # from_pretrained's overrides are assignments too; a list changed in place is caught when a model reads it.
    with pytest.raises(ValueError, match="sliding_window = -12 is refused"):
        SenriConfig.from_dict(config.to_dict(), sliding_window=-12)
    config.layer_types[1] = "memroy"
    with pytest.raises(ValueError, match="'memroy' is unknown"):
        SenriForCausalLM(config)


def test_no_tensor_or_pipeline_parallel_plan_is_advertised():
    model = tiny_model()
    assert model.config.base_model_tp_plan is None and model.config.base_model_pp_plan is None
    assert model.tp_plan == {} and model.pp_plan == {} and model.model.tp_plan == {}
    assert not model.supports_tp_plan and not model.supports_pp_plan


def test_torch_export_traces_the_forward_and_keeps_the_input_checks_as_runtime_assertions():
    import pytest

    model = tiny_model(num_sink_tokens=2)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(3))

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits

    positions = torch.arange(45)[None].expand(2, 45)
    program = torch.export.export(Logits(model), (ids, torch.ones_like(ids), positions))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(program.module()(ids, torch.ones_like(ids), positions), expected, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="position_ids must continue the cache"):
        program.module()(ids, torch.ones_like(ids), positions + 1)
    padded = torch.ones_like(ids)
    padded[1, :3] = 0  # left padding is an eager-mode feature (its per-row offsets are data-dependent)
    with pytest.raises(RuntimeError, match="left padding is not supported under torch.compile / torch.export"):
        program.module()(ids, padded, positions)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    import pytest

    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(4))  # 5+ windows: memory is written

    def loss_and_grads(checkpointing: dict | None):
        model = tiny_model(num_sink_tokens=2, layer_types=["memory_only", "memory", "sliding_attention"]).train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        calls = []
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # Checkpointed layers really ran again in the backward pass.
        assert len(calls) == (3 if checkpointing is None else 6)
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(None)
    assert plain_grads["model.layers.1.self_attn.memory_gate"].abs().sum() > 0
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        with pytest.warns(FutureWarning):  # gradient_checkpointing_enable is transformers' deprecated alias
            loss, grads = loss_and_grads(kwargs)
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
        assert grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_saved_model_loads_with_trust_remote_code_in_a_process_that_cannot_import_senri(tmp_path):
    import json
    import subprocess
    import sys
    import textwrap

    model = tiny_model(num_sink_tokens=2)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_senri.SenriConfig",
                                  "AutoModelForCausalLM": "modeling_senri.SenriForCausalLM"}
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    repo_root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    script = textwrap.dedent(f"""
        import sys

        class HideSenri:  # whatever installed senri (editable or not), this process cannot import it
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name == "senri" or name.startswith("senri."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None

        sys.meta_path = [HideSenri] + [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path = [p for p in sys.path if p not in ("", {repo_root!r})]
        try:
            import senri
            raise SystemExit("senri is importable")
        except ModuleNotFoundError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "SenriForCausalLM" and type(model).__module__.startswith("transformers_modules")
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
        assert not [name for name in sys.modules if name == "senri" or name.startswith("senri.")]
    """)
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-6)


@__import__("pytest").mark.slow
def test_pip_install_into_a_fresh_venv_gives_an_importable_senri_with_its_declared_dependencies(tmp_path):
    """`pip install .` with nothing downloaded: no index, no build isolation; the fresh venv sees this venv's packages
    through a path file (not its .pth files, so not the editable senri), and pip must find every declared dependency
    among them."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    shutil.copytree(repo / "senri", source / "senri", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "existing_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                    "--no-build-isolation", str(source)], check=True)
    script = ("import importlib.metadata as m, senri; print(senri.__file__); "
              "print('|'.join(r for r in m.requires('senri') if 'extra ==' not in r))")
    located, requires = subprocess.run([str(python), "-c", script], check=True, capture_output=True, text=True,
                                       cwd=tmp_path).stdout.split()
    assert Path(located).is_relative_to(purelib)  # the installed copy, not this checkout
    requires = requires.split("|")
    assert "transformers<6,>=5.24" in requires and not [r for r in requires if r.startswith("torch")]
    # requirements.txt refers to them rather than repeating them.
    lines = [line.split("#")[0].strip() for line in (repo / "requirements.txt").read_text().splitlines()]
    assert ".[dev]" in lines and not {line.split(">")[0].split("<")[0] for line in lines} & {
        r.split(">")[0].split("<")[0] for r in requires}


def test_a_sliding_window_that_is_not_a_multiple_of_the_chunk_size_covers_whole_chunks_rounded_up():
    """sliding_window=2 with chunk_size=8 (what transformers' eager/SDPA tests set): one whole chunk, the same model
    as sliding_window=8, streaming like one pass and equal to the explicit (output_attentions) path."""
    from senri import SenriConfig
    from tests.conftest import tiny_config

    fields = dict(chunk_size=8, num_sink_tokens=2, layer_types=["sliding_attention", "memory", "memory_only"])
    config = tiny_config(sliding_window=2, **fields)
    assert (config.window_chunks, config.window_length, config.sink_distance) == (1, 8, 8 + 8 + 2)
    assigned = tiny_config(**fields)
    assigned.sliding_window = 2  # as transformers' tests assign it
    assert assigned.window_chunks == 1 and SenriConfig.from_dict(config.to_dict()).window_chunks == 1
    assert tiny_config(sliding_window=9, chunk_size=8).window_chunks == 2  # a partial chunk counts whole
    assert tiny_config(sliding_window=0, chunk_size=8).window_chunks == 0

    model, whole_chunk = tiny_model(sliding_window=2, **fields), tiny_model(sliding_window=8, **fields)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(11))  # chunks leave: memory written
    with torch.no_grad():
        one_pass = model(input_ids=ids).logits
        torch.testing.assert_close(whole_chunk(input_ids=ids).logits, one_pass, rtol=0, atol=0)
        explicit = model(input_ids=ids, output_attentions=True)
        for pieces in ([1] * 45, [3, 10, 1, 17, 14]):
            cache, logits, start = SenriCache(model.config, batch_size=2), [], 0
            for n in pieces:
                logits.append(model(input_ids=ids[:, start : start + n], cache=cache).logits)
                start += n
            torch.testing.assert_close(torch.cat(logits, dim=1), one_pass, rtol=0, atol=1e-5)
            assert cache.layers[1].state.written_chunks == 44 // 8 - 1
    torch.testing.assert_close(explicit.logits, one_pass, rtol=0, atol=1e-5)
    # A query in chunk c sees chunks c - 1 .. c (up to itself) and the two sinks.
    q, k = torch.arange(45)[:, None], torch.arange(45)[None]
    visible = (k <= q) & ((k >= (q // 8 - 1) * 8) | (k < 2))
    for weights in explicit.attentions[:2]:
        assert not weights[..., ~visible].any() and (weights[..., visible] > 0).all()


def test_cache_layers_hold_the_windows_rotated_keys_and_values_in_transformers_layout_after_forward_and_decoding():
    """SenriCacheLayer.keys/values: (batch, kv_heads, tokens, head_dim), the window's tokens, keys RoPE'd at their
    positions, as transformers' DynamicLayer holds them (a converted Llama's own cache is the reference)."""
    import pytest
    from transformers import LlamaConfig, LlamaForCausalLM

    from senri import convert_llama_to_senri

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    senri = convert_llama_to_senri(llama, sliding_window=2, chunk_size=8, num_sink_tokens=0,
                                   layer_types=["sliding_attention", "memory"]).eval()
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(12))  # no pad token (0) inside
    with torch.no_grad():
        reference = llama(ids, use_cache=True).past_key_values
        short = senri(input_ids=ids[:, :12]).cache  # nothing has left the window (chunk 1 sees chunk 0)
        cache = senri(input_ids=ids).cache  # positions 16..29 remain: 29 // 8 - 1 = 2 chunks left the window
    for idx in range(2):
        layer, state = short.layers[idx], short.layer_state(idx)
        assert layer.keys.shape == layer.values.shape == (2, 2, 12, 8)
        torch.testing.assert_close(layer.keys, reference.layers[idx].keys[:, :, :12], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.values, reference.layers[idx].values[:, :, :12], rtol=0, atol=1e-5)
        assert layer.keys is state.rotated_keys and layer.values is state.values  # views of the state
        assert cache.layers[idx].keys.shape == (2, 2, 14, 8) and cache.layer_state(idx).window_start == 16
    # Layer 0's keys depend on their own token only: the window's equal the reference's at the same positions.
    torch.testing.assert_close(cache.layers[0].keys, reference.layers[0].keys[:, :, 16:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.layers[0].values, reference.layers[0].values[:, :, 16:], rtol=0, atol=1e-5)
    with pytest.raises(AttributeError, match="read from its LayerState"):
        cache.layers[0].keys = torch.zeros(1)

    # After decoding (generate's returned cache): the window slid with the stream, same layout and contents.
    out = senri.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    decoded = out.cache
    assert decoded.seen_tokens == 35 and decoded.layer_state(0).window_start == 24  # 34 // 8 - 1 = 3 chunks written
    with torch.no_grad():
        reference = llama(out.sequences[:, :35], use_cache=True).past_key_values
    for idx in range(2):
        assert decoded.layers[idx].keys.shape == decoded.layers[idx].values.shape == (2, 2, 11, 8)
    torch.testing.assert_close(decoded.layers[0].keys, reference.layers[0].keys[:, :, 24:], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded.layers[0].values, reference.layers[0].values[:, :, 24:], rtol=0, atol=1e-5)

    # memory_only layers have no RoPE path: their raw keys (the current chunk's); full attention: every token.
    layer_types = ["sliding_attention", "memory", "memory_only", "full_attention"]
    model = tiny_model(num_hidden_layers=4, layer_types=layer_types, num_sink_tokens=2)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :27]).cache
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [27 - (26 // 4 - 4) * 4, 27 - (26 // 4 - 4) * 4, 27 - 26 // 4 * 4, 27]
    assert cache.layers[2].keys is cache.layer_state(2).keys
    assert cache.layers[3].keys is cache.layer_state(3).rotated_keys
    # A state restored without its rotated keys exposes none until its next forward rotates them.
    restored = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
    assert restored.layers[0].keys is None and restored.layers[0].values is None
    with torch.no_grad():
        model(input_ids=ids[:, 27:], cache=restored)
    assert restored.layers[0].keys.shape[2] == 30 - (29 // 4 - 4) * 4


def test_generate_without_a_cache_passes_none_and_equals_generate_with_one():
    """use_cache=False: no cache argument reaches GenerationMixin.generate (beam search / beam sampling would refuse
    one it cannot reorder); every step recomputes the sequence in one pass, which equals streaming it."""
    model = tiny_model(num_sink_tokens=2)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    modes = {
        "greedy": dict(do_sample=False),
        "beam search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
        "beam sample": dict(do_sample=True, num_beams=2, top_k=5),
        "sample": dict(do_sample=True, top_k=5),
    }
    for name, kwargs in modes.items():
        outputs = {}
        for use_cache in (True, False):
            torch.manual_seed(14)
            outputs[use_cache] = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0,
                                                use_cache=use_cache, return_dict_in_generate=True, **kwargs)
        assert outputs[False].cache is None and isinstance(outputs[True].cache, SenriCache), name
        assert outputs[True].sequences.shape[1] == 32, name
        assert torch.equal(outputs[False].sequences, outputs[True].sequences), name
    # From the generation config as from the keyword.
    model.generation_config.use_cache = False
    try:
        plain = model.generate(ids, max_new_tokens=12, num_beams=2, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
    finally:
        model.generation_config.use_cache = True
    assert plain.cache is None
    cached = model.generate(ids, max_new_tokens=12, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.sequences, cached)


def test_output_attentions_and_hidden_states_are_honoured_from_the_config_as_from_the_keyword():
    layer_types = ["sliding_attention", "memory", "memory_only", "full_attention"]
    model = tiny_model(num_hidden_layers=4, layer_types=layer_types, num_sink_tokens=2)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(15))
    model.config._attn_implementation = "eager"  # transformers' config refuses output_attentions with "sdpa"
    with torch.no_grad():
        keyword = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        model.config.output_attentions = model.config.output_hidden_states = True
        from_config = model(input_ids=ids)
        base = model.model(input_ids=ids)
        overridden = model(input_ids=ids, output_attentions=False, output_hidden_states=False)
        model.config.output_attentions = model.config.output_hidden_states = False
        plain = model(input_ids=ids)
    for outputs in (from_config, base):
        assert len(outputs.attentions) == 4 and len(outputs.hidden_states) == 5
        for got, expected in zip(outputs.attentions + outputs.hidden_states[:-1],
                                 keyword.attentions + keyword.hidden_states[:-1]):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_config.logits, keyword.logits, rtol=0, atol=0)
    assert overridden.attentions is None and overridden.hidden_states is None
    assert plain.attentions is None and plain.hidden_states is None
    # The weights returned are those the output is computed from: a gradient reaches them (as Llama's eager path).
    model.config.output_attentions = True
    try:
        outputs = model(input_ids=ids)
    finally:
        model.config.output_attentions = False
    softmax_layers = [outputs.attentions[i] for i in (0, 1, 3)]  # memory_only (2) has no softmax path: zeros
    for weights in softmax_layers:
        weights.retain_grad()
    outputs.logits[0, -1].sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in softmax_layers)
    # So do those of a left-padded batch (assembled from its rows' own): each row's, as that row's alone.
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    grads = []
    for row_ids, row_mask, row in ((ids, mask, 1), (ids[1:, 7:], None, 0)):
        outputs = model(input_ids=row_ids, attention_mask=row_mask, output_attentions=True)
        for i in (0, 1, 3):
            outputs.attentions[i].retain_grad()
        outputs.logits[row, -1].sum().backward()
        grads.append([outputs.attentions[i].grad[row, :, -23:, -23:] for i in (0, 1, 3)])
    for padded, alone in zip(*grads):
        assert padded.abs().sum() > 0
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)
