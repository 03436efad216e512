"""The compiled training step: masked causal-LM loss, loss scaling, gradient all-reduce, clipping, AdamW.

Three graphs share one update path (`Update`): `FusedStep` (forward, backward and update in one call, used
without gradient accumulation) and `AccumulateStep` + `ApplyStep` (micro-batches add their gradients into
buffers; the last call updates). Learning rate, loss scale and everything else that changes per step are
tensors, so each graph compiles once.

The optimizer is MindFormers' FP32StateAdamWeightDecay, i.e. MindSpore's AdamWeightDecay with float32
moments: no bias correction, decoupled weight decay (not on 1-D tensors such as norm weights and biases). The
trained parameters are float32 masters (MindFormers' param_init_type; the trainer builds them so whatever the
checkpoint's dtype), so the update is one fused kernel per parameter and never assigns a bf16 tensor, which
MindSpore's CPU Assign cannot. An update whose gradients are not finite is skipped (dynamic loss scaling then
lowers the scale); the host sees `finite` and decides.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from llama.data.records import IGNORE_ID
from llama.device import compiled_or_eager


class CausalLMLoss(nn.Cell):
    """Rows of seq_length + 1 tokens: predict token t+1 from tokens <= t, as MindFormers' LlamaForCausalLM.

    Positions whose input token is padding or whose label is -100 are left out, and the loss is their mean.
    Pretraining passes the input ids as labels. With `scored` (`scored_positions` of the training rows) the
    net computes logits at each row's `scored` top positions of that mask only: for SQuAD-style rows (a few
    answer tokens after a long prompt) that skips most of the output projection and its log-softmax, forward
    and backward (about 5% of the demo's SmolLM2-135M LoRA step, measured); the loss is the same sum over the
    same positions.
    """

    def __init__(self, net: nn.Cell, pad_token_id: int, scored: int | None = None):
        super().__init__(auto_prefix=False)
        self.net = net
        self.pad_token_id = pad_token_id
        self.scored = scored

    def construct(self, input_ids, labels):
        tokens = input_ids[:, :-1]
        targets = labels[:, 1:]
        mask = ops.logical_and(tokens != self.pad_token_id, targets != IGNORE_ID).astype(ms.float32)
        if self.scored is None:
            logits = self.net(tokens)
        else:
            # every counted position, topped up with uncounted ones (mask 0) to `scored` per row
            mask, at = ops.topk(mask, self.scored)
            at = at.astype(ms.int32)
            targets = ops.gather_elements(targets, 1, at)
            logits = self.net(tokens, only_at=at)
        # log_softmax + gather rather than ops.cross_entropy, whose CPU backward is about twice as slow
        log_probs = ops.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
        picked = ops.gather_elements(log_probs, 1, ops.maximum(targets, 0).reshape(-1, 1)).reshape(-1)
        count = ops.maximum(mask.sum(), 1.0)
        return -(picked * mask.reshape(-1)).sum() / count


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Function", "Tensor", "Number", "Number", "Number", "Tensor",
                        "Tensor", "Tensor", "Tensor", "Number", "Tensor")
def _adamw_update_one(fused_adamw, lr, beta1, beta2, eps, factor, param, moment1, moment2, decay, grad):
    """One parameter's fused AdamW step on its unscaled, clipped gradient."""
    return fused_adamw(param, moment1, moment2, lr, beta1, beta2, eps, decay, grad * factor)


class Update(nn.Cell):
    """Average gradients over workers, unscale, clip by global norm and apply AdamW when all are finite."""

    def __init__(self, params: ParameterTuple, beta1: float, beta2: float, eps: float, weight_decay: float,
                 max_grad_norm: float | None, world_size: int):
        super().__init__()
        not_masters = [f"{p.name} ({p.dtype})" for p in params if p.dtype != ms.float32]
        if not_masters:
            raise ValueError(f"trained parameters must be float32 masters: {', '.join(not_masters)}")
        self.params = params
        self.moment1 = params.clone(prefix="adam_m", init="zeros")
        self.moment2 = params.clone(prefix="adam_v", init="zeros")
        self.decay = tuple(weight_decay if len(p.shape) > 1 else 0.0 for p in params)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.all_reduce = ops.AllReduce() if world_size > 1 else None
        self.fused_adamw = ops.AdamWeightDecay()
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr, divisor):
        """`divisor` = loss scale x micro-batches; returns (global grad norm, finite)."""
        if self.all_reduce is not None:
            grads = tuple(self.all_reduce(g) for g in grads)
            divisor = divisor * self.world_size
        square_sum = ops.zeros((), ms.float32)
        for g in grads:
            # the last axis first: on CPU one reduction over all elements is about 5x slower
            square_sum = square_sum + ops.square(g).sum(-1).sum()
        norm = ops.sqrt(square_sum) / divisor
        finite = ops.isfinite(norm)
        if finite:
            # unscaling and clipping fold into one factor, so each gradient is multiplied once
            clip = ops.ones((), ms.float32)
            if self.max_grad_norm is not None:
                clip = ops.minimum(clip, self.max_grad_norm / (norm + 1e-6))
            factor = clip / divisor
            # one HyperMap, not a loop: a loop inside `if` compiles to calls nested per parameter, past
            # MindSpore's call-depth limit for a 30-layer full finetune
            self.hyper_map(ops.partial(_adamw_update, self.fused_adamw, lr, self.beta1, self.beta2, self.eps, factor),
                           self.params, self.moment1, self.moment2, self.decay, grads)
        return norm, finite


class _Gradients(nn.Cell):
    """loss and d(loss x scale)/d(trainable params)."""

    def __init__(self, loss: CausalLMLoss, params: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.params = params

    def construct(self, input_ids, labels, scale):
        value = self.loss(input_ids, labels)
        grads = self.grad(self.loss, self.params)(input_ids, labels, scale.astype(value.dtype))
        return value, grads


class FusedStep(nn.Cell):
    def __init__(self, gradients: _Gradients, update: Update, world_size: int):
        super().__init__(auto_prefix=False)
        self.gradients, self.update = gradients, update
        self.loss_mean = _LossMean(world_size)

    def construct(self, input_ids, labels, lr, scale):
        loss, grads = self.gradients(input_ids, labels, scale)
        norm, finite = self.update(grads, lr, scale)
        return self.loss_mean(loss), norm, finite


class AccumulateStep(nn.Cell):
    def __init__(self, gradients: _Gradients, buffers: ParameterTuple, world_size: int):
        super().__init__(auto_prefix=False)
        self.gradients, self.buffers = gradients, buffers
        self.loss_mean = _LossMean(world_size)

    def construct(self, input_ids, labels, scale):
        loss, grads = self.gradients(input_ids, labels, scale)
        for i in range(len(grads)):
            ops.assign_add(self.buffers[i], grads[i])
        return self.loss_mean(loss)


class ApplyStep(nn.Cell):
    def __init__(self, update: Update, buffers: ParameterTuple):
        super().__init__(auto_prefix=False)
        self.update, self.buffers = update, buffers

    def construct(self, lr, divisor):
        norm, finite = self.update(tuple(self.buffers), lr, divisor)
        for buffer in self.buffers:
            ops.assign(buffer, ops.zeros_like(buffer))
        return norm, finite


class _LossMean(nn.Cell):
    """The loss averaged over workers, so every rank logs the global batch's loss."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.all_reduce = ops.AllReduce() if world_size > 1 else None

    def construct(self, loss):
        if self.all_reduce is None:
            return loss
        return self.all_reduce(loss) / self.world_size


class Stepper:
    """Runs one optimizer step over `accumulation` micro-batches; holds the optimizer state."""

    def __init__(self, net: nn.Cell, pad_token_id: int, optimizer, max_grad_norm: float | None,
                 accumulation: int, world_size: int, scored: int | None = None):
        params = ParameterTuple(net.trainable_params())
        self.update = Update(params, optimizer.beta1, optimizer.beta2, optimizer.eps, optimizer.weight_decay,
                             max_grad_norm, world_size)
        gradients = _Gradients(CausalLMLoss(net, pad_token_id, scored), params)
        self.accumulation = accumulation
        # compiled, unless the graph's copy of the weights would not fit (llama.device): then eager
        if accumulation == 1:
            self.fused = compiled_or_eager(FusedStep(gradients, self.update, world_size).construct, net)
        else:
            buffers = params.clone(prefix="grad_buffer", init="zeros")
            self.accumulate = compiled_or_eager(AccumulateStep(gradients, buffers, world_size).construct, net)
            self.apply = compiled_or_eager(ApplyStep(self.update, buffers).construct, net)

    def optimizer_state(self) -> list[Parameter]:
        return [*self.update.moment1, *self.update.moment2]

    def step(self, micro_batches, lr: float, scale: float, before_micro=None) -> tuple[float, float, bool]:
        """micro_batches: [(input_ids, labels)] numpy int32; returns (mean loss, grad norm, finite)."""
        lr_t, scale_t = Tensor(lr, ms.float32), Tensor(scale, ms.float32)
        if self.accumulation == 1:
            (input_ids, labels), = micro_batches
            if before_micro:
                before_micro(0)
            loss, norm, finite = self.fused(Tensor(input_ids), Tensor(labels), lr_t, scale_t)
            return float(loss.asnumpy()), float(norm.asnumpy()), bool(finite.asnumpy())
        losses = []
        for micro, (input_ids, labels) in enumerate(micro_batches):
            if before_micro:
                before_micro(micro)
            losses.append(float(self.accumulate(Tensor(input_ids), Tensor(labels), scale_t).asnumpy()))
        norm, finite = self.apply(lr_t, Tensor(scale * self.accumulation, ms.float32))
        return sum(losses) / len(losses), float(norm.asnumpy()), bool(finite.asnumpy())
