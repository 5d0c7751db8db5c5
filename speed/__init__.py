"""Speed tricks for training, each behind its own switch of `train.speed` (SpeedConfig).

With every switch off, a training run is the plain loop of training/loop.py. Each trick gives
the same numbers bit for bit (tests/test_speed.py), except `compile`, whose fused kernels round
differently, and `length_parts`, which sums the same loss in another order; bench/ measures what each pays, on the device it is meant for (docs/performance.md):
- stored_weights: nn.Linear weights stored in the autocast dtype (StoredLinearWeights) instead of
  cast at every use: fewer operator calls per step, which bound a GPU step.
- features_on_device: the whole image-token table on the GPU when it fits, so a step gathers its
  rows there instead of on the host plus a copy.
- numpy_gather: a table on the CPU gathered with numpy's take (torch's index kernel on fp16 rows
  of 257 x 1024 is far slower: bench/loader.py).
- compile: the loss compiled by torch.compile; the CUDA-graph modes pad caption widths to a
  multiple of COMPILE_WIDTH_STEP, so that a handful of shapes are recorded.
- length_parts: a batch's captions sorted by length and computed as this many sub-batches, each
  padded to its own longest caption, their losses weighted by their share of the batch's targets:
  the batch's mean token loss, summed in another order (so not bit for bit), with less padding,
  which a compute-bound step (the CPU) pays for.
"""
import contextlib
import sys
from dataclasses import dataclass

import torch

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_WIDTH_STEP = 8


@dataclass
class SpeedConfig:
    stored_weights: bool = True
    features_on_device: bool = True
    numpy_gather: bool = True
    compile: str = "none"  # a torch.compile mode of the training loss (COMPILE_MODES); none: eager
    length_parts: int = 1  # sub-batches of similar caption length per batch (1: the batch whole)

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.speed.compile={self.compile!r}: must be one of "
                             f"{', '.join(map(repr, COMPILE_MODES))}")
        if self.length_parts < 1:
            raise ValueError(f"train.speed.length_parts={self.length_parts!r}: must be at least 1")
        if self.length_parts > 1 and self.compile in CUDA_GRAPH_MODES:
            # a step would replay two graphs before its backward, and the second one's replay
            # overwrites the first one's outputs
            raise ValueError(f"train.speed.length_parts={self.length_parts} needs a compile mode "
                             f"without CUDA graphs, not {self.compile!r}")

    @property
    def width_multiple(self):
        """Caption widths are rounded up to this: CUDA graphs are recorded per shape."""
        return COMPILE_WIDTH_STEP if self.compile in CUDA_GRAPH_MODES else 1


class TrainingSpeedups:
    """A context manager around a training run: inside, the switches of `config` (SpeedConfig)
    are in effect for `model` training on the image-token table `tokens` under autocast to
    `dtype` (None: fp32) on `device`. It gives what a training step uses: `rows(indices)` (the
    table's rows on the device), `loss` (model.loss, compiled or not), `width_multiple`, and
    three calls around the optimiser step (no-ops unless weights are stored). Inside, the model
    holds working copies of its trainable Linear tensors: the trained values are in the
    parameters it held before (the masters), which it holds again on exit."""

    def __init__(self, model, tokens, config, dtype, device, group_by_image=False,
                 store_trainable=True):
        self.model, self.config, self.device = model, config, torch.device(device)
        self.tokens = tokens
        if config.features_on_device:
            self.tokens = on_device_if_fits(tokens, self.device)
        self.stored = StoredLinearWeights(model, dtype if config.stored_weights else None,
                                          store_trainable)
        self.compiled = compiled_loss(model, config.compile, group_by_image)
        self.width_multiple = config.width_multiple
        self.length_parts = config.length_parts

    def __enter__(self):
        self.stored.__enter__()
        try:
            self.loss = self.compiled.__enter__()
        except BaseException:
            self.stored.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.compiled.__exit__(*exc)
        self.stored.__exit__()

    def rows(self, indices):
        """The table's rows `indices` (a LongTensor), on the device."""
        if self.config.numpy_gather:
            return gather_rows(self.tokens, indices).to(self.device, non_blocking=True)
        return self.tokens[indices.to(self.tokens.device)].to(self.device, non_blocking=True)

    def zero_grad(self):
        self.stored.zero_grad()

    def grads_to_masters(self):
        self.stored.grads_to_masters()

    def masters_to_copies(self):
        self.stored.masters_to_copies()


def gather_rows(tokens, rows):
    """`tokens[rows]`; a CPU tensor through numpy's take."""
    if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu":
        return torch.from_numpy(tokens.numpy()[rows.numpy()])
    return tokens[rows.to(tokens.device)]


def on_device_if_fits(tokens, device, share=0.5):
    """The whole image-token table on the GPU when it takes under `share` of its free memory."""
    if torch.device(device).type != "cuda" or not isinstance(tokens, torch.Tensor):
        return tokens
    free, _ = torch.cuda.mem_get_info(device)
    return tokens.to(device) if tokens.numel() * tokens.element_size() < share * free else tokens


@contextlib.contextmanager
def compiled_loss(model, mode, group_by_image):
    """Inside: `model.loss`, compiled by torch.compile in `mode` ("none": the eager method itself).

    The batch and caption-width dimensions are compiled as dynamic, so one compilation serves
    every batch (a size threshold inside inductor may add one more for small last batches). With
    CUDA graphs (CUDA_GRAPH_MODES) each distinct shape is recorded once, which the widths
    rounded to COMPILE_WIDTH_STEP keep to a handful. Compiled code is cached per code object, so
    the cache is reset on entry and exit: Captioner.loss of an earlier model must not count
    against this one's recompile limit. Where compiling fails (inductor cannot compile the
    visual-prefix captioner on torch 2.11, docs/performance.md), one line says so and the run
    goes on eagerly: nothing has run yet when the first forward fails to compile."""
    if mode == "none":
        yield model.loss
        return
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, mode=mode)
    state = {"eager": False, "compiled_once": False}

    def loss(visual, input_ids, targets, image_index=None):
        given = (visual, input_ids, targets, image_index)
        if state["eager"]:
            return model.loss(*given)
        # One graph serves every batch only if image_index is always given or never. With
        # group_by_image: always (an identity one where no image repeats). Without: never; the few
        # batches that repeat an image (~14% at batch 64) get its rows repeated, rather than every
        # batch paying an identity index_select per cross-attention layer.
        if group_by_image and image_index is None:
            image_index = torch.arange(len(input_ids), device=input_ids.device)
        elif not group_by_image and image_index is not None:
            visual, image_index = visual.index_select(0, image_index), None
        for t in (visual, input_ids, targets, image_index):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in (input_ids, targets):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch.compiler.cudagraph_mark_step_begin()   # the previous step's graph outputs are spent
        if state["compiled_once"]:
            return compiled(visual, input_ids, targets, image_index)
        try:
            out = compiled(visual, input_ids, targets, image_index)
        except Exception as e:   # inductor's errors have no common base class
            print(f"train.speed.compile={mode}: torch.compile failed ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:150] if str(e).strip() else ''}); training "
                  "eagerly", file=sys.stderr, flush=True)
            torch._dynamo.reset()
            state["eager"] = True
            return model.loss(*given)
        state["compiled_once"] = True
        return out
    try:
        yield loss
    finally:
        torch._dynamo.reset()


class StoredLinearWeights:
    """A context manager: inside, the weights and biases of the model's nn.Linear modules are
    stored in `dtype` (None: nothing changes), for training or decoding under autocast to `dtype`.

    Autocast casts each fp32 Linear tensor to `dtype` at every use, and a trainable one's gradient
    back to fp32 in the backward: four operator calls per trainable tensor per step, and on a GPU
    four kernel launches, which bound a training step there (docs/performance.md). Stored cast, the
    products are the same bit for bit (the same rounding of the same fp32 values):
    - a frozen tensor is replaced by its cast copy;
    - a trainable one by a cast working copy, which the forward reads and the backward fills with
      gradients, while its fp32 original stays the master that the optimizer updates (build the
      optimizer over the originals, before entering). Each step, `grads_to_masters()` after the
      backward and `masters_to_copies()` after the optimizer step carry the gradients up and the
      values down, one foreach call each for every tensor at once.
    A Linear sharing its weight with an Embedding (the tied lm_head) is left alone: the residual
    stream reads that table in fp32. `trainable=False` stores only the frozen tensors (the
    trainable ones are then cast by autocast, as before; bench/gpu.py compares). On exit the
    original parameters are back in the modules, the same objects, holding what the optimizer
    made of them."""

    def __init__(self, model, dtype, trainable=True):
        self.model, self.dtype, self.trainable = model, dtype, trainable
        self.slots = []                    # (module, attribute, original, stored)
        self.masters, self.copies, self.grads = [], [], []   # trainable: fp32, cast, fp32 grads

    def __enter__(self):
        if self.dtype is None:
            return self
        try:
            self._store()
        except BaseException:   # out of memory half-way: leave the model as it was
            self.__exit__()
            raise
        return self

    def _store(self):
        tables = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        stored = {}   # id(original) -> its stored copy: a tensor shared by two modules stays shared
        for module in self.model.modules():
            if not isinstance(module, torch.nn.Linear) or id(module.weight) in tables:
                continue
            for attribute in ("weight", "bias"):
                original = getattr(module, attribute)
                if original is None or (original.requires_grad and not self.trainable):
                    continue
                if id(original) not in stored:
                    copy = torch.nn.Parameter(original.detach().to(self.dtype, copy=True),
                                              requires_grad=original.requires_grad)
                    stored[id(original)] = copy
                    if original.requires_grad:
                        self.masters.append(original)
                        self.copies.append(copy)
                        self.grads.append(torch.zeros_like(original))
                self.slots.append((module, attribute, original, stored[id(original)]))
                setattr(module, attribute, stored[id(original)])

    def __exit__(self, *exc):
        for module, attribute, original, _ in self.slots:
            setattr(module, attribute, original)
        self.slots, self.masters, self.copies, self.grads = [], [], [], []

    def zero_grad(self):
        for copy in self.copies:
            copy.grad = None

    def grads_to_masters(self):
        """The working copies' gradients, in fp32, as their masters' gradients (a copy that got
        no gradient leaves its master's None, as autocast would). A master that also got a
        gradient of its own (used directly by a module that is not a Linear) gets the sum."""
        got = [i for i, copy in enumerate(self.copies) if copy.grad is not None]
        if got:
            torch._foreach_copy_([self.grads[i] for i in got], [self.copies[i].grad for i in got])
        for i in got:
            master = self.masters[i]
            if master.grad is None:
                master.grad = self.grads[i]
            else:
                master.grad += self.grads[i]

    @torch.no_grad()
    def masters_to_copies(self):
        if self.copies:
            torch._foreach_copy_(self.copies, self.masters)
