"""A model saved and loaded as a whole: the network, its preconditioning (and so its schedule), what it
consumes (sample shape, data range, condition fields) in one JSON record, ``ModelSpec``, stored beside the
weights. Loading a model needs that record and the weights, never the training data or its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from difflab.conditioning import Condition, condition_from_json
from difflab.denoiser import Denoiser, precond_from_json
from difflab.errors import DifflabError
from difflab.nets.registry import load_network


@dataclass
class ModelSpec:
    network: str                                  # a kind of ``difflab.nets.registry.NETWORKS``
    network_options: dict                         # its resolved config (sizes fitted to the data)
    precond: dict                                 # ``Precond.to_json()``
    sample_shape: tuple[int, ...]                 # one sample, e.g. (1, 28, 28) or (2,)
    data_range: tuple[float, float] | None        # the range D may be clipped to (pixels); None: no clipping
    conditions: list[dict] = field(default_factory=list)   # ``Condition.to_json()`` of each field
    learned_variance: bool = False
    autoencoder: dict | None = None               # latent models: ``LatentSpace.to_json()`` (weights: frozen.autoencoder)

    def to_json(self) -> dict:
        return {"network": self.network, "network_options": self.network_options, "precond": self.precond,
                "sample_shape": list(self.sample_shape),
                "data_range": list(self.data_range) if self.data_range is not None else None,
                "conditions": self.conditions, "learned_variance": self.learned_variance,
                **({"autoencoder": self.autoencoder} if self.autoencoder is not None else {})}

    @classmethod
    def from_json(cls, values: dict, source: str = "model") -> "ModelSpec":
        try:
            return cls(values["network"], dict(values["network_options"]), dict(values["precond"]),
                       tuple(int(s) for s in values["sample_shape"]),
                       tuple(values["data_range"]) if values.get("data_range") is not None else None,
                       list(values.get("conditions", [])), bool(values.get("learned_variance", False)),
                       dict(values["autoencoder"]) if values.get("autoencoder") is not None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise DifflabError(f"{source}: invalid model description ({e!r})") from None

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one output: the sample shape, or for a latent model its autoencoder's images."""
        if self.autoencoder is None:
            return self.sample_shape
        options = self.autoencoder["network_options"]
        return (int(options["in_channels"]), int(options["image_size"]), int(options["image_size"]))

    def condition_fields(self) -> dict[str, Condition]:
        return {c.name: c for c in map(condition_from_json, self.conditions)}

    def num_classes(self) -> int | None:
        """Classes of the ``label`` condition, if the model has one."""
        label = self.condition_fields().get("label")
        return getattr(label, "num_classes", None)


def denoiser_from_spec(spec: ModelSpec) -> Denoiser:
    """The model's denoiser with freshly initialised weights (load them with ``checkpoint.load_weights``)."""
    net = load_network(spec.network, spec.network_options)
    conditions = spec.condition_fields()
    unknown = sorted(set(conditions) - set(getattr(net, "consumes", ())))
    if unknown:
        raise DifflabError(f"network {spec.network!r} does not consume the condition(s) {unknown}")
    return Denoiser(net, precond_from_json(spec.precond), conditions, spec.learned_variance)
