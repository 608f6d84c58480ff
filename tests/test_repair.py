"""Repair after pruning (plugins/repair): closed forms for the re-fit and the bias, loss, layouts, export."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LAYOUTS, make_tiny_llama
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.builtin.repair import (
    bias_compensate,
    bias_export_plan,
    clean_gutenberg,
    flap_bias,
    kept_columns,
    pd_books,
    pd_books_text,
    refit,
    ridge_solve,
)
from prunekit.plugin.registry import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=4, batch=4, seq=32, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def _pruned(layout="gqa8x2", layers=(0, 4), ratio=0.5, model=None):
    """(pruned model, dense copy, prune result); layers=(0, 4) prunes every layer alike (uniform shapes)."""
    model = model if model is not None else make_tiny_llama(*LAYOUTS[layout])
    dense = copy.deepcopy(model)
    result = prunekit.prune(model, None, method="magnitude", ratio=ratio, layers=layers,
                            allocation={"name": "uniform"})
    return model, dense, result


def _adapter(model):
    return get_registry().adapter_for(model)


@torch.no_grad()
def _io(model, names, batches):
    """Inputs and outputs of the named modules over the batches, flattened to [tokens, width] float64."""
    xs = {n: [] for n in names}
    ys = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(_m, args, out, n=n):
            xs[n].append(args[0].reshape(-1, args[0].shape[-1]).double())
            ys[n].append(out.reshape(-1, out.shape[-1]).double())
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        for b in batches:
            model(input_ids=b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs[n]) for n in names}, {n: torch.cat(ys[n]) for n in names}


def _loss(model, batches):
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)


# ------------------------------------------------------------------------------------ columns


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kept_columns_are_the_pruned_weights_columns(layout):
    pruned, dense, result = _pruned(layout, layers=(1, 3))
    cols = kept_columns(result)
    assert set(cols) == {f"model.layers.{i}.{m}" for i in (1, 2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    for name, c in cols.items():
        assert torch.equal(pruned.get_submodule(name).weight, dense.get_submodule(name).weight[:, c])
    assert kept_columns(result.groups, result.kept).keys() == cols.keys()


# --------------------------------------------------------------------------------- closed forms


def test_ridge_solve_matches_the_normal_equations_with_an_unpenalised_intercept():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 7, generator=g, dtype=torch.float64), torch.randn(200, 3, generator=g, dtype=torch.float64)
    y += 5.0
    w, b = ridge_solve(x.T @ x, x.T @ y, 0.0, sum_x=x.sum(0), sum_y=y.sum(0), n=200)
    xa = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(xa, y).solution
    assert torch.allclose(w, ref[:7].T, atol=1e-9) and torch.allclose(b, ref[7], atol=1e-9)
    lam = 0.1 * float((x.T @ x).diagonal().mean())
    w, b = ridge_solve(x.T @ x, x.T @ y, 0.1)
    assert b is None and torch.allclose(w, torch.linalg.solve(x.T @ x + lam * torch.eye(7, dtype=x.dtype), x.T @ y).T)
    w0 = torch.randn(3, 7, generator=g, dtype=torch.float64)  # anchored: argmin ||XW^T - Y||² + λ||W - W0||²
    w, _ = ridge_solve(x.T @ x, x.T @ y, 0.1, anchor=w0)
    stacked = torch.cat([x, lam ** 0.5 * torch.eye(7, dtype=x.dtype)]), torch.cat([y, lam ** 0.5 * w0.T])
    assert torch.allclose(w, torch.linalg.lstsq(*stacked).solution.T, atol=1e-9)
    w, _ = ridge_solve(x.T @ x, x.T @ y, 1e9, anchor=w0)
    assert torch.allclose(w, w0, atol=1e-6)  # a huge ridge gives back the anchor


@pytest.mark.parametrize("inputs", ["dense", "sequential"])
def test_refit_is_the_least_squares_solution_on_its_inputs(inputs):
    """ridge=0: every re-fitted projection equals lstsq(X, Y_dense) on the inputs it was fitted on. Those are
    X_d[:, kept] (dense), or the re-fitted model's own inputs: a projection's input depends only on earlier
    layers and, for down_proj, on the already re-fitted o_proj, so the final model reproduces them."""
    pruned, dense, result = _pruned("gqa8x2")
    batches = _batches()
    cols = kept_columns(result)
    report = refit(pruned, dense, _adapter(pruned), batches, ridge=0.0, inputs=inputs, columns=cols)
    names = sorted(cols)
    x_d, y_d = _io(dense, names, batches)
    x_p, _ = _io(pruned, names, batches) if inputs == "sequential" else ({n: x_d[n][:, cols[n]] for n in names}, None)
    for name in names:
        assert x_p[name].shape[0] > x_p[name].shape[1]  # determined system
        ref = torch.linalg.lstsq(x_p[name], y_d[name]).solution.T
        got = pruned.get_submodule(name).weight.double()
        assert torch.allclose(got, ref, atol=2e-4, rtol=1e-3), (name, float((got - ref).abs().max().detach()))
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3] and report["tokens"] == 4 * 4 * 32
    for layer in report["layers"]:
        for kind in ("attention", "mlp"):
            assert layer[kind]["rel_error_after"] <= layer[kind]["rel_error_before"] + 1e-9


def test_refit_ridge_is_the_regularised_solution_towards_zero_or_the_pruned_weights():
    pruned, dense, result = _pruned("mha4")
    batches, cols = _batches(), kept_columns(result)
    anchored = copy.deepcopy(pruned)
    w0 = {n: anchored.get_submodule(n).weight.double().detach().clone() for n in cols}
    refit(pruned, dense, _adapter(pruned), batches, ridge=0.05, inputs="dense", columns=cols, anchor="zero")
    refit(anchored, dense, _adapter(anchored), batches, ridge=0.05, inputs="dense", columns=cols)  # anchor: pruned
    x_d, y_d = _io(dense, sorted(cols), batches)
    for name, c in cols.items():
        x = x_d[name][:, c]
        gram = x.T @ x
        lam = 0.05 * float(gram.diagonal().mean())
        eye = torch.eye(len(c), dtype=gram.dtype)
        ref = torch.linalg.solve(gram + lam * eye, x.T @ y_d[name]).T
        assert torch.allclose(pruned.get_submodule(name).weight.double(), ref, atol=1e-4, rtol=1e-3)
        ref = torch.linalg.solve(gram + lam * eye, x.T @ y_d[name] + lam * w0[name].T).T
        assert torch.allclose(anchored.get_submodule(name).weight.double(), ref, atol=1e-4, rtol=1e-3)


def test_bias_is_flap_and_exact_in_expectation():
    """Dense inputs: b = W_d[:, removed] · mean(X_d[:, removed]), so the pruned projection's mean output on the
    dense inputs equals the dense one."""
    pruned, dense, result = _pruned("gqa9x3")
    batches, cols = _batches(), kept_columns(result)
    before = {n: pruned.get_submodule(n).weight.clone() for n in cols}
    report = bias_compensate(pruned, dense, _adapter(pruned), batches, columns=cols)
    x_d, y_d = _io(dense, sorted(cols), batches)
    for name, c in cols.items():
        lin, w_d = pruned.get_submodule(name), dense.get_submodule(name).weight.double()
        removed = torch.ones(w_d.shape[1], dtype=torch.bool)
        removed[c] = False
        flap = w_d[:, removed] @ x_d[name][:, removed].mean(0)
        assert torch.allclose(lin.bias.double(), flap, atol=1e-5)
        assert torch.allclose(flap_bias(dense.get_submodule(name).weight, x_d[name].mean(0), c), flap)
        assert torch.equal(lin.weight, before[name])  # weights untouched
        mean_pruned = (x_d[name][:, c] @ lin.weight.double().T + lin.bias.double()).mean(0)
        assert torch.allclose(mean_pruned, y_d[name].mean(0), atol=1e-5)
    assert report["config_flags"] == {"attention_bias": True, "mlp_bias": True}
    for layer in report["layers"]:
        assert layer["mlp"]["rel_error_after"] <= layer["mlp"]["rel_error_before"]


def test_sequential_bias_matches_the_mean_on_the_pruned_models_own_inputs():
    pruned, dense, result = _pruned("gqa4x2")
    batches = _batches()
    bias_compensate(pruned, dense, _adapter(pruned), batches, inputs="sequential")  # needs no columns
    names = sorted(kept_columns(result))
    _, y_p = _io(pruned, names, batches)
    _, y_d = _io(dense, names, batches)
    for name in names:
        assert torch.allclose(y_p[name].mean(0), y_d[name].mean(0), atol=1e-5)


def test_dense_inputs_need_the_kept_columns():
    pruned, dense, _ = _pruned("mha4")
    with pytest.raises(ValueError, match="columns"):
        refit(pruned, dense, _adapter(pruned), _batches(), inputs="dense")


# ---------------------------------------------------------------------------------- the model


def _trained_tiny(steps=60, seed=0):
    """A tiny model trained briefly on a learnable token process, so its loss means something."""
    model = make_tiny_llama(8, 2, seed=seed)
    with torch.no_grad():  # undo the conftest spread: a plain init trains quickly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = _process(8, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _process(batch, seq, g):
    """Tokens that follow t[i] = (t[i-1] + t[i-2] + noise) mod 96: predictable from context."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    ids[:, :2] = torch.randint(0, 96, (batch, 2), generator=g)
    for i in range(2, seq):
        ids[:, i] = (ids[:, i - 1] + ids[:, i - 2] + torch.randint(0, 3, (batch,), generator=g)) % 96
    return ids


def test_repair_lowers_the_calibration_loss():
    model = _trained_tiny()
    g = torch.Generator().manual_seed(7)
    batches = [_process(8, 32, g) for _ in range(4)]
    pruned, dense, result = _pruned(model=model, ratio=0.5)
    cols = kept_columns(result)
    base = _loss(pruned, batches)
    assert _loss(dense, batches) < base  # pruning hurt
    losses = {}
    for name, fn in {"bias": lambda m: bias_compensate(m, dense, _adapter(m), batches, columns=cols),
                     "refit": lambda m: refit(m, dense, _adapter(m), batches, columns=cols),  # the defaults
                     "refit-seq": lambda m: refit(m, dense, _adapter(m), batches, ridge=1e-2, inputs="sequential"),
                     "refit-zero": lambda m: refit(m, dense, _adapter(m), batches, ridge=1e-2, anchor="zero",
                                                   columns=cols)}.items():
        m = copy.deepcopy(pruned)
        fn(m)
        losses[name] = _loss(m, batches)
    assert all(loss <= base for loss in losses.values()), (base, losses)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_refit_and_bias_with_gqa_and_per_layer_shapes(layout):
    pruned, dense, result = _pruned(layout, layers=(1, 3), ratio=0.34)
    assert not result.uniform_shapes
    batches = _batches(n=2)
    report = refit(pruned, dense, _adapter(pruned), batches, ridge=1e-2, fit_bias=True, inputs="sequential")
    assert [r["layer"] for r in report["layers"]] == [1, 2]
    assert report["config_flags"] == {"attention_bias": True, "mlp_bias": True}
    # every projection the flags govern has a bias now (zeros where nothing was fitted)
    for i in range(4):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert not pruned.get_submodule(f"model.layers.{i}.{name}").bias.any()
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=batches[0]).logits).all()


def _same_logits(a, b, ids):
    with torch.no_grad():
        return torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("layers", [(0, 4), (1, 3)], ids=["uniform", "per-layer"])
def test_repaired_checkpoint_round_trips(tmp_path, layers):
    pruned, dense, result = _pruned("gqa9x3", layers=layers)
    batches = _batches(n=2)
    refit(pruned, dense, _adapter(pruned), batches, columns=kept_columns(result))
    bias_compensate(pruned, dense, _adapter(pruned), batches, inputs="sequential")
    out = prunekit.save(result, tmp_path / "out")
    ids = torch.arange(20).view(2, 10)
    loaded = prunekit.load_pruned(out)
    assert loaded.model.layers[1].mlp.down_proj.bias is not None and _same_logits(loaded, pruned, ids)
    if result.uniform_shapes:
        plain = AutoModelForCausalLM.from_pretrained(out)
    else:
        plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert _same_logits(plain, pruned, ids)


def test_unloadable_bias_is_refused_before_any_change():
    """A family whose config has no flag for an o_proj bias (Qwen2): refused unless loadable=False."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    pruned, dense, result = _pruned(model=model.eval(), layers=(0, 2))
    plan = bias_export_plan(pruned, ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"])
    assert plan["unsupported"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.raises(ValueError, match="bias"):
        bias_compensate(pruned, dense, _adapter(pruned), _batches(n=1), columns=kept_columns(result))
    assert pruned.state_dict().keys() == state.keys()
    report = bias_compensate(pruned, dense, _adapter(pruned), _batches(n=1), columns=kept_columns(result),
                             loadable=False)
    assert report["config_flags"] == {} and pruned.model.layers[0].self_attn.o_proj.bias is not None


# ------------------------------------------------------------------------------------- pd-books


def test_pd_books_splits_are_disjoint_clean_text():
    train, valid = pd_books("train"), pd_books("valid")
    assert len(train) > 5000 and len(valid) > 300
    shared = set(train) & set(valid)  # disjoint by book: only headings may repeat
    assert shared <= {"CONTENTS"} | {f"{n}" for n in "I II III IV V VI VII VIII IX X XI XII".split()}
    assert sum(len(p.split()) for p in valid) > 30_000
    for text in (train, valid):
        joined = "\n".join(text).lower()
        assert "gutenberg" not in joined and "http" not in joined
    assert train[3].startswith("It is a truth universally acknowledged")
    text = pd_books_text("validation")
    assert text.source == "pd-books" and text.split == "validation" and text.documents == tuple(valid)
    with pytest.raises(ValueError, match="split"):
        pd_books("test")


def test_clean_gutenberg_keeps_only_the_body():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
           "Produced by someone\r\n\r\nFirst _line_\r\nwrapped.\r\n\r\n[Illustration: a cat]\r\n\r\nSecond.\r\n\r\n"
           "End of the Project Gutenberg EBook of X\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence")
    assert clean_gutenberg(raw) == ["First line wrapped.", "Second."]
    with pytest.raises(ValueError):
        clean_gutenberg("no markers")
