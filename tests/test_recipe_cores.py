"""recipe.cores: the main process takes the cores the evaluation workers leave free, without changing results."""
import torch

from layerprune.recipe.cores import CoreShare

from conftest import make_tiny


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_thread_count_follows_the_busy_workers_and_is_restored():
    before = torch.get_num_threads()
    busy = [1]
    model = make_tiny("llama")
    x = torch.randint(0, 100, (2, 8))
    with CoreShare(3, lambda: busy[0], every_s=0.0) as share:
        model(input_ids=x)
        assert torch.get_num_threads() == 2  # 3 cores, one worker busy
        busy[0] = 0
        model(input_ids=x)  # the check runs at the next forward
        assert torch.get_num_threads() == 3
        with share.paused():  # measurements run at the process's own count, whatever the workers do
            busy[0] = 2
            model(input_ids=x)
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1  # 3 cores - 2 busy; never below 1
        busy[0] = 5
        share.apply()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    model(input_ids=x)  # the hook is gone
    assert torch.get_num_threads() == before


def test_results_do_not_depend_on_the_thread_count():
    """Why a share may change threads mid-run: logits and gradients are bitwise equal at 1 and 2 threads."""
    before = torch.get_num_threads()
    model = make_tiny("llama", hidden_size=128, intermediate_size=256)
    x = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    try:
        torch.set_num_threads(1)
        logits1, grads1 = _forward_backward(model, x)
        torch.set_num_threads(2)
        logits2, grads2 = _forward_backward(model, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(logits1, logits2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
