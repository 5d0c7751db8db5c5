"""Mixed precision: the dtype names params.yaml uses, and autocast to one of them."""
import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}   # None: plain fp32


def autocast(device_type, dtype):
    """torch.autocast to `dtype` on `device_type`; dtype None leaves autocast off."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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
