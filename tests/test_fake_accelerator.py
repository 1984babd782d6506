"""The fake accelerator (tests/fake_accelerator.py): it refuses what CUDA refuses, allows what
CUDA allows, and runs real models, LoRA training and Lightning loops."""
from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from torch import nn

from fake_accelerator import DEVICE, DeviceMismatch, FakeTensor, paused
from sieve_pl.models.forward import cache_name

MIXED = "Expected all tensors to be on the same device"


def test_mixing_a_host_tensor_raises(fake_device):
    x = torch.randn(3, 3).to(fake_device)
    host = torch.randn(3, 3)
    mixes = {"matmul": lambda: x @ host, "add": lambda: x + host, "sub_": lambda: x.sub_(host),
             "cat": lambda: torch.cat([x, host]), "stack": lambda: torch.stack([host, x]),
             "index_select": lambda: x.index_select(0, torch.tensor([0, 2])),
             "embedding": lambda: nn.functional.embedding(torch.tensor([[0, 1]]), x),
             "where": lambda: torch.where(torch.tensor([True, False, True]), x, 0.0),
             "host first": lambda: host - x,
             "real meta": lambda: x + torch.zeros(3, device="meta")}
    for name, mix in mixes.items():
        with pytest.raises(DeviceMismatch, match=MIXED):
            mix()
            pytest.fail(f"{name} mixed devices without an error")


def test_what_cuda_allows_is_allowed(fake_device, tmp_path):
    x = torch.arange(12.0).reshape(4, 3).to(fake_device)
    assert isinstance(x, FakeTensor) and x.device == DEVICE
    assert (x * torch.tensor(2.0)).device == DEVICE  # a 0-dim host tensor
    idx, mask = torch.tensor([0, 2]), torch.tensor([True, False, True, False])
    assert x[idx].tolist() == x[mask].tolist() == [[0, 1, 2], [6, 7, 8]]
    y = x.clone()
    y[idx] = torch.tensor(-1.0)
    y[mask, 0] = 5.0
    y[1:2] = torch.ones(1, 3)  # copy_ from the host
    assert y.cpu().tolist() == [[5, -1, -1], [1, 1, 1], [5, -1, -1], [9, 10, 11]]
    host = torch.empty(4, 3)
    host.copy_(x)
    assert type(host) is torch.Tensor and host.equal(torch.arange(12.0).reshape(4, 3))
    back = x.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu"
    assert type(x.to("cpu", torch.float64)) is torch.Tensor
    assert x.sum().item() == float(x.sum()) == 66 and int(x.argmax()) == 11 and bool(x.any())
    assert f"{x.sum():.1f}" == "66.0"
    assert torch.where(x > 5, x, 0.0).device == DEVICE
    for made in (torch.zeros(2, device=fake_device), torch.arange(3, device=fake_device),
                 torch.tensor([1, 2], device=fake_device), x.new_zeros(2), torch.ones_like(x),
                 torch.randn(2).to(x), torch.eye(3, device=fake_device)):
        assert isinstance(made, FakeTensor), made
    spd = x.T @ x + torch.eye(3, device=fake_device)
    chol = torch.linalg.cholesky(spd)
    for out in (torch.linalg.eigh(spd).eigenvectors, torch.linalg.solve(spd, x.T),
                torch.linalg.solve_triangular(chol, torch.eye(3, device=fake_device),
                                              upper=False), torch.linalg.svd(x).U):
        assert out.device == DEVICE
    buffer = io.BytesIO()
    torch.save({"x": x}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["x"].equal(back)  # saved as a host tensor
    from safetensors.torch import load_file, save_file

    save_file({"x": x.cpu()}, str(tmp_path / "x.safetensors"))
    assert load_file(str(tmp_path / "x.safetensors"))["x"].equal(back)


def test_modules_autograd_and_inference_mode(fake_device):
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(fake_device)
    assert isinstance(linear.weight, nn.Parameter) and linear.weight.device == DEVICE
    leaf = torch.randn(4, 3, requires_grad=True)  # on the host: gradients come back there
    linear(leaf.to(fake_device)).square().sum().backward()
    assert leaf.grad.device.type == "cpu" and linear.weight.grad.device == DEVICE
    with torch.inference_mode():
        view = linear.weight.detach().double().unflatten(0, (2, 1))  # views of normal tensors
        assert view.device == DEVICE
    with pytest.raises(RuntimeError, match=MIXED):
        linear(torch.randn(4, 3))
    linear.cpu()
    assert type(linear.weight.data) is torch.Tensor


def test_real_meta_tensors_stay_meta_and_paused_is_plain(fake_device):
    with torch.device("meta"):
        reference = nn.Linear(3, 2)
    assert reference.weight.is_meta and not isinstance(reference.weight, FakeTensor)
    with paused():
        assert not isinstance(torch.zeros(2, device=fake_device), FakeTensor)
    assert isinstance(torch.zeros(2, device=fake_device), FakeTensor)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_on_the_fake_device_gives_the_cpu_logits(make_tiny_llama, fake_device, attention):
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(make_tiny_llama("tiny_llama"),
                                               attn_implementation=attention).eval()
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    position = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = net(input_ids=ids, attention_mask=mask, position_ids=position).logits
        net.to(fake_device)
        got = net(input_ids=ids.to(fake_device), attention_mask=mask.to(fake_device),
                  position_ids=position.to(fake_device)).logits
        assert got.device == DEVICE
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
        # greedy steps on the key/value cache
        out = net(input_ids=ids.to(fake_device), attention_mask=mask.to(fake_device),
                  use_cache=True, logits_to_keep=1)
        step = net(input_ids=out.logits[:, -1].argmax(-1)[:, None],
                   attention_mask=torch.cat([mask, mask.new_ones(3, 1)], 1).to(fake_device),
                   use_cache=True, **{cache_name(): getattr(out, cache_name())})
        assert step.logits.device == DEVICE
        with pytest.raises(RuntimeError, match=MIXED):
            net(input_ids=ids, attention_mask=mask.to(fake_device))


def test_lora_training_step(make_tiny_llama, fake_device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(make_tiny_llama("tiny_llama")).to(fake_device)
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["q_proj", "v_proj",
                                                                "down_proj"]))
    model.train()  # transformers re-kernelizes here: the kernels library must not see meta
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.device == DEVICE for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    ids = torch.randint(1, 100, (4, 9)).to(fake_device)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    merged = model.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.weight.device == DEVICE


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.devices: set = set()

    def _step(self, batch):
        x, y = batch
        self.devices |= {x.device, y.device, self.linear.weight.device}
        return nn.functional.cross_entropy(self.linear(x), y)

    def predict_step(self, batch, batch_idx):
        return self.linear(batch[0])

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loops_run_on_the_fake_device(fake_trainer, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from fake_accelerator import fake_trainer as make

    assert fake_trainer.strategy.root_device == DEVICE
    loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,))),
                        batch_size=4)
    module = Probe()
    predictions = fake_trainer.predict(module, loader)
    assert all(p.device == DEVICE for p in predictions)
    assert module.linear.weight.device.type == "cpu"  # Lightning's teardown, as on a GPU
    trainer = make(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert trainer.validate(module, loader, verbose=False)[0]["val_loss"] > 0
    assert module.devices == {DEVICE}
    state = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert state["state_dict"]["linear.weight"].device.type == "cpu"
