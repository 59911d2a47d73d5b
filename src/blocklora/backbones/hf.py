"""transformers dual encoders, chosen by config.model_type: where adapters go, tokenizer, preprocessing, export.

model_type     class              vision tower                           text tower
clip           CLIPModel          vision_model.encoder.layers.{i}         text_model.encoder.layers.{i}.self_attn
metaclip_2     MetaClip2Model       .self_attn: q_proj, k_proj, v_proj,   (q_proj, k_proj, v_proj, out_proj)
siglip         SiglipModel          out_proj (CLIP_ATTENTION)             SigLIP pools the LAST position: prompts
                                                                          are padded to the fixed length
chinese_clip   ChineseCLIPModel                                          text_model.encoder.layer.{i}.attention (BERT)
altclip        AltCLIPModel                                              text_model.roberta.encoder.layers.{i}
                                                                          .attention (XLM-R; BERT_ATTENTION)
siglip2 (NaFlex, variable resolution) is refused: its images are patch sequences with pixel_attention_mask and
spatial_shapes, which blocklora does not build (the fixed-resolution SigLIP 2 checkpoints are model_type siglip).
A checkpoint is only ever loaded into the class its model_type names, and one missing any weight is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.targeting import LINEARS, Site, Targeting
from ..errors import AdapterMismatchError, BackboneError
from ..reading import loads, read_text, reason
from .activation import Activation
from .base import Backbone, check_padding, check_token_ids, write_classifier
from .network import hub_reachable
from .preprocess import Preprocess, ProcessorError, check_processor_config, from_image_processor

CLIP_ATTENTION = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))
# A BERT / RoBERTa layer's `attention`: self.query / key / value, then output.dense (also effnet-minilm's MiniLM).
BERT_ATTENTION = (("q", "self.query"), ("k", "self.key"), ("v", "self.value"), ("o", "output.dense"))
BERT_LAYERS = ("encoder.layer", "encoder.layers", "roberta.encoder.layer", "roberta.encoder.layers")
FAMILIES = {"clip": "CLIPModel", "metaclip_2": "MetaClip2Model", "siglip": "SiglipModel",
            "chinese_clip": "ChineseCLIPModel", "altclip": "AltCLIPModel"}
REFUSED = {"siglip2": "a SigLIP 2 NaFlex (variable-resolution) checkpoint: its images are patch sequences with "
                      "pixel_attention_mask and spatial_shapes, which blocklora does not build; use a fixed-resolution "
                      "SigLIP 2 checkpoint (model_type siglip, e.g. google/siglip2-base-patch16-224)"}
PAD_TO_FIXED_LENGTH = ("siglip",)  # text towers that pool the last position (and were trained without a mask)
# Text towers trained on canonicalized prompts: big_vision's canonicalize_text (lowercase, punctuation removed,
# whitespace collapsed), which open_clip applies to every SigLIP and SigLIP 2 config (tokenizer_kwargs clean
# "canonicalize"). SigLIP's own SiglipTokenizer does it too; the Gemma tokenizer of the fixed-resolution SigLIP 2
# checkpoints (model_type siglip) is case-sensitive and does not (huggingface/transformers#43054).
CANONICALIZED = ("siglip",)
POSITION_OFFSET = {"altclip": 2}  # RoBERTa position ids start after padding_idx: 2 positions are never a token


def _layers(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        return None
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def clip_sites(model: nn.Module, prefix: str, tower: str) -> tuple[Site, ...]:
    """CLIP-style encoder layers at `prefix` (…encoder.layers): one site per `self_attn`."""
    layers = _layers(model, prefix)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        return ()
    return tuple(Site(tower, i, f"{prefix}.{i}.self_attn", LINEARS, CLIP_ATTENTION) for i in range(len(layers)))


def bert_sites(root: nn.Module, prefix: str, tower: str) -> tuple[Site, ...]:
    """The BERT / RoBERTa layers under `root` (named `prefix` in the model): one site per layer's `attention`."""
    for path in BERT_LAYERS:
        layers = _layers(root, path)
        if layers is not None and all(hasattr(getattr(layer, "attention", None), "self") for layer in layers):
            return tuple(Site(tower, i, f"{prefix}.{path}.{i}.attention", LINEARS, BERT_ATTENTION)
                         for i in range(len(layers)))
    return ()


def placement(model: nn.Module) -> Targeting | None:
    """Sites of a transformers dual encoder (or one of its towers); None for any other model."""
    if not type(model).__module__.startswith("transformers."):
        return None
    vision = clip_sites(model, "vision_model.encoder.layers", "vision")
    text = clip_sites(model, "text_model.encoder.layers", "text")
    text_model = getattr(model, "text_model", None)
    if not text and isinstance(text_model, nn.Module):
        text = bert_sites(text_model, "text_model", "text")
    towers = {t: type(getattr(model, f"{t}_model")).__name__ if hasattr(model, f"{t}_model") else f"no {t}_model"
              for t in ("vision", "text")}
    return Targeting(f"transformers {type(model).__name__}", {"vision": vision, "text": text}, towers)


class HFBackbone(Backbone):
    """A transformers dual encoder from a local directory (config.json + weights, tokenizer, preprocessor config)
    or a hub id. `tokenizer_source`: where its tokenizer is (the model's folder unless --tokenizer says otherwise)."""

    family = "transformers"
    tower_prefixes = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}

    def __init__(self, name: str, model: nn.Module, source: str, preprocess: Preprocess,
                 tokenizer_source: str) -> None:
        super().__init__(name, model, source, preprocess)
        self.model_type = model.config.model_type
        self.tokenizer_source = tokenizer_source
        self.model.eval()

    def placement(self) -> Targeting:
        return placement(self.model)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=images))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """transformers' per-layer checkpointing, non-reentrant: the frozen embeddings' output needs no gradient,
        and the reentrant variant would then pass none to the adapters inside the layers."""
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 (the old names warn)
            if enabled:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.activation_checkpointing_disable()
        elif enabled:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_disable()

    # -- texts -----------------------------------------------------------------------------------------------------
    def _text_config(self) -> Any:
        return self.model.config.text_config

    def max_tokens(self) -> int:
        """The longest prompt the text tower's position table holds (fixed length for SigLIP)."""
        return int(self._text_config().max_position_embeddings) - POSITION_OFFSET.get(self.model_type, 0)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        local = os.path.isdir(self.tokenizer_source) or not hub_reachable()  # offline: the hub cache
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source, local_files_only=local)
        except (OSError, ValueError, ImportError, TypeError, AttributeError, KeyError) as e:  # no tokenizer files,
            # sentencepiece missing, a damaged tokenizer_config.json (a pad_token 5: TypeError), ...
            raise BackboneError(f"cannot load the tokenizer of {self.name} from {self.tokenizer_source}: "
                                f"{str(e).strip().splitlines()[0][:160]}; pass --tokenizer DIR (a folder written "
                                "by the tokenizer's save_pretrained)") from None
        check_padding(tokenizer, self.name, self.tokenizer_source)
        return tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """SigLIP: ids padded to the fixed length, no mask (it pools the last position and was trained so).
        Others: ids and attention mask padded to the batch's longest prompt (exact: causal towers pool at the
        end-of-text token, BERT towers mask the padding), cut to what the position table holds.
        SigLIP / SigLIP 2 prompts are canonicalized first (CANONICALIZED), as open_clip does for the same weights."""
        texts = self.clean_texts(texts)
        fixed = self.model_type in PAD_TO_FIXED_LENGTH
        out = self.tokenizer(list(texts), padding="max_length" if fixed else True, truncation=True,
                             max_length=self.max_tokens(), return_tensors="pt")
        check_token_ids(out["input_ids"], int(self._text_config().vocab_size), self.name, self.tokenizer_source)
        if fixed:
            return {"input_ids": out["input_ids"]}
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def clean_texts(self, texts: Sequence[str]) -> list[str]:
        """The prompts as the text tower was trained to read them (CANONICALIZED; others as written)."""
        if self.model_type not in CANONICALIZED:
            return list(texts)
        from open_clip.tokenizer import canonicalize_text

        return [canonicalize_text(t) for t in texts]

    def probe_tokens(self) -> dict[str, torch.Tensor]:
        """Three valid ids (start, a word, end) in tokenize's format, without the tokenizer."""
        cfg = self._text_config()
        vocab = int(cfg.vocab_size)
        ids = [i if isinstance(i, int) and 0 <= i < vocab else j
               for i, j in ((cfg.bos_token_id, 0), (5 % vocab, 1), (cfg.eos_token_id, vocab - 1))]
        tokens = {"input_ids": torch.tensor([ids])}
        if self.model_type not in PAD_TO_FIXED_LENGTH:
            tokens["attention_mask"] = torch.ones(1, 3, dtype=torch.long)
        return tokens

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _tensor(self.model.get_text_features(**tokens))

    # -- export ----------------------------------------------------------------------------------------------------
    def export(self, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
               classifier: dict[str, Any] | None = None) -> list[str]:
        """A stock transformers directory: the model's own class (e.g. SiglipModel.from_pretrained(path)) loads it
        with no blocklora; the tokenizer and preprocessor config are copied beside it. `classifier`'s class names
        become config.json's id2label / label2id (the config's standard label fields), the rest
        blocklora_classifier.json."""
        path = Path(path)
        if classifier is not None:
            names = classifier["classnames"]
            self.model.config.id2label = dict(enumerate(names))
            self.model.config.label2id = {n: i for i, n in enumerate(names)}
        self.model.save_pretrained(path, state_dict=state_dict)
        write_classifier(path, classifier)
        self.tokenizer.save_pretrained(path)
        for name in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE):  # the processor's files, as the checkpoint has them
            found = _file(self.pretrained, name)
            if found is not None:
                (path / name).write_text(Path(found).read_text())
        return sorted(str(p) for p in path.iterdir())


def _tensor(out) -> torch.Tensor:
    """transformers 5.x returns an output object (embedding in .pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _file(source: str | None, filename: str) -> str | None:
    """`filename` of a local model folder or of a hub id (from the hub cache, or the hub when reachable)."""
    if source is None:
        return None
    if os.path.isdir(source):
        path = Path(source) / filename
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(source, filename, local_files_only=not hub_reachable(),
                           _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


# Where a checkpoint's image processor is, in transformers' order (ImageProcessingMixin.get_image_processor_dict):
# processor_config.json's nested "image_processor" (what a processor's save_pretrained writes in transformers 5),
# else preprocessor_config.json (every earlier save, and the hub's files)
PROCESSOR_FILE, IMAGE_PROCESSOR_FILE = "processor_config.json", "preprocessor_config.json"


def image_processor_file(source: str | None) -> str | None:
    """The file transformers reads the checkpoint's image processor from (PROCESSOR_FILE with an "image_processor"
    entry, else IMAGE_PROCESSOR_FILE), or None when it has none."""
    nested = _file(source, PROCESSOR_FILE)
    if nested is not None:
        try:
            holds = "image_processor" in loads(read_text(nested))
        except (OSError, ValueError, TypeError):
            holds = True  # unreadable: AutoImageProcessor reports why
        if holds:
            return nested
    return _file(source, IMAGE_PROCESSOR_FILE)


def preprocess_of(source: str, model_type: str, image_size: int, local: bool = True) -> Preprocess:
    """The checkpoint's preprocessing: its own image processor (AutoImageProcessor reads its
    preprocessor_config.json, any form: legacy integer sizes, shortest_edge, height / width, ...), else the family's
    processor at its defaults for the model's image size. The processor's file is found as transformers finds it
    (image_processor_file: a transformers 5 processor's processor_config.json first). Raises BackboneError when the
    processor cannot be read, or when the images it gives are not the image_size x image_size the vision tower
    takes."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    found = image_processor_file(source)
    if found is not None:
        from transformers import AutoImageProcessor

        try:
            record = loads(read_text(found))  # reading.py first: a regular file, nesting bounded (transformers would
        except (OSError, ValueError) as e:  # hang on a FIFO and overflow the stack on deep nesting)
            raise BackboneError(f"cannot read {found} ({reason(e)}): the model folder is damaged") from None
        nested = Path(found).name == PROCESSOR_FILE  # the processor's file holds the image processor's config inside
        check_processor_config(record.get("image_processor") if nested and isinstance(record, dict) else record,
                               found + (' ("image_processor")' if nested else ""), f"fix {Path(found).name}")
        try:
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local or not hub_reachable())
        except Exception as e:  # noqa: BLE001 - a user file: ValueError, KeyError, TypeError, OSError, ...
            raise BackboneError(f"cannot read the image processor of {source} ({found}): "
                                f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}; "
                                f"fix {Path(found).name} (a file written by the image processor's "
                                "save_pretrained)") from None
        label = found
    elif model_type in PAD_TO_FIXED_LENGTH:
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
        label = "SiglipImageProcessor's defaults (no preprocessor_config.json or processor_config.json)"
    else:
        processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
        label = "CLIPImageProcessor's defaults (no preprocessor_config.json or processor_config.json)"
    try:
        preprocess = from_image_processor(processor, label)
    except ProcessorError as failed:
        # transformers 5's default torchvision backend cannot resample with some of PIL's filters (box, hamming):
        # its PIL backend, the same processor class computed with PIL, can
        if found is None or getattr(processor, "backend", None) != "torchvision":
            raise
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local or not hub_reachable(),
                                                       backend="pil")
        try:
            preprocess = from_image_processor(processor, label)
        except ProcessorError:
            raise failed from None  # neither backend can: the default one's reason
    if preprocess.size != image_size:
        raise BackboneError(f"{source}: its image processor ({label}) gives {preprocess.size}x{preprocess.size} "
                            f"images, but the vision tower takes {image_size}x{image_size} (config.json "
                            f"vision_config.image_size): the image processor's config and the weights are for other "
                            "image sizes; use the checkpoint's own image processor config")
    return preprocess


def model_type_of(spec: str, local: bool) -> str:
    """config.json's model_type, read without building anything; one-line errors for what blocklora refuses."""
    found = _file(spec, "config.json")
    if found is None:
        if os.path.isfile(os.path.join(spec, "open_clip_config.json")):
            from .openclip_sources import open_clip_folder_hint

            raise BackboneError(f"{spec} is {open_clip_folder_hint(spec)}, not hf:")
        raise BackboneError(f"{spec} has no config.json: pass a folder written by save_pretrained, or a hub id")
    try:
        config = loads(read_text(found))  # reading.py: a regular file, nesting bounded
        model_type = config.get("model_type") if isinstance(config, dict) else None
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot read {found}: {e}") from None
    if model_type in REFUSED:
        raise BackboneError(f"{spec} is {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise BackboneError(f"{spec} is a transformers {model_type!r} model: blocklora adapts the dual encoders "
                            f"{', '.join(FAMILIES)} (config.json's model_type)")
    return model_type


def load(spec: str, quick_gelu: str = "auto", recorded_quick_gelu: bool | None = None,
         tokenizer: str | None = None) -> HFBackbone:
    """`spec` is a local directory or a hub id (the part after 'hf:'); `tokenizer` an optional local folder.

    The MLP activation is the config's hidden_act (transformers records it with the weights); --quick-gelu yes/no
    overrides it in both towers, and an adapter's recorded activation must match it.
    """
    import transformers

    local = os.path.isdir(spec)
    if local:  # recorded absolute: the adapter's record then holds from any working directory
        spec = os.path.abspath(spec)
    if not local and (spec.startswith((".", "/", "~")) or os.path.sep in spec and spec.count("/") > 1):
        raise BackboneError(f"transformers model directory {spec} does not exist: pass a directory holding "
                            "config.json and model.safetensors, or a hub id")
    # offline, a hub id is read from the Hugging Face cache (where a download put it), as transformers does
    cache_only = local or not hub_reachable()
    found = _file(spec, "config.json")
    if not local and cache_only and found is None:
        raise BackboneError(f"cannot download {spec} from the hub (no network) and it is not in the Hugging Face "
                            "cache: download it elsewhere (save_pretrained) and pass --model hf:/path/to/dir")
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise BackboneError(f"tokenizer directory {tokenizer} does not exist: pass a folder written by the "
                            "tokenizer's save_pretrained")
    model_type = model_type_of(spec, local)
    cls = getattr(transformers, FAMILIES[model_type])
    try:  # transformers 5 validates its config fields' types and values through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        StrictDataclassError = ValueError  # noqa: N806 - older hubs: transformers raises ValueError itself
    try:
        config = cls.config_class.from_pretrained(spec, local_files_only=cache_only)
    except (OSError, ValueError, TypeError, StrictDataclassError) as e:
        raise BackboneError(f"cannot read the {cls.__name__} config of {spec}: "
                            f"{' '.join(str(e).split())[:240]}; fix config.json or use the one the weights were "
                            "saved with") from None
    act = _activation(config, spec, quick_gelu, recorded_quick_gelu)
    # before any weights are read: a processor that does not fit the tower fails at once
    preprocess = preprocess_of(spec, model_type, _square(config.vision_config.image_size), local)
    if found is not None:  # the folder, or the hub cache's snapshot folder (the weights beside config.json, if any)
        check_weight_shapes(str(Path(found).parent), cls, config, spec)
    try:
        model, info = cls.from_pretrained(spec, config=config, local_files_only=cache_only, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise BackboneError(f"cannot load {spec} as a transformers {cls.__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with random values and only warn
        raise BackboneError(f"{spec} is not a complete {cls.__name__} checkpoint: {len(missing)} weights are missing "
                            f"(first: {missing[0]}); pass the checkpoint of this model type")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:  # transformers drops them with a warning: a config with fewer layers than the weights, ...
        raise BackboneError(f"{spec}: {len(unexpected)} weights have no place in the {cls.__name__} its config.json "
                            f"describes (first: {unexpected[0]}), so they would be dropped; fix config.json (e.g. "
                            "num_hidden_layers) or use the one the weights were saved with")
    backbone = HFBackbone(f"hf:{spec}", model, spec, preprocess, tokenizer or spec)
    backbone.activation = act
    return backbone


# The weights of a local model folder, in transformers' order of preference: one file, or the shards its index names
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _weight_files(folder: str) -> list[str]:
    """The weights files of a local model folder: model.safetensors or its shards, else pytorch_model.bin (older
    hub snapshots) or its shards."""
    path = Path(folder)
    for single, index in WEIGHT_FILES:
        if (path / single).is_file():
            return [str(path / single)]
        try:
            shards = sorted(set(loads(read_text(path / index))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        return [str(path / f) for f in shards if (path / f).is_file()]
    return []


def _tensor_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a weights file without reading its tensors: the safetensors header, or a torch zip file's
    records mapped onto the meta device ({} for a file torch cannot map so: transformers' own check then applies)."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not iterable
    try:
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy (pre-zip) or damaged file: transformers reports it when loading
        return {}
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) \
        else {}


def check_weight_shapes(folder: str, cls: type, config: Any, label: str | None = None) -> None:
    """Refuse weights whose tensors have other shapes than the model config.json describes (another image size or
    patch grid, context length, width), naming the tensor, both shapes and, for a position table, both sizes.
    `label`: how the error names the checkpoint (default `folder`; a hub id for the hub cache's snapshot folder).

    The shapes come from the weights files' headers (safetensors; a pytorch_model.bin mapped onto the meta device)
    and a model built on the meta device: no weight is read, and transformers' own refusal (a table on the console,
    then an error about ignore_mismatched_sizes) never comes."""
    files = _weight_files(folder)
    if not files:
        return
    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - a config transformers takes but cannot build (patch_size 0: a division)
        raise BackboneError(f"{label or folder}: transformers cannot build the {cls.__name__} its config.json "
                            f"describes ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}); "
                            "fix config.json or use the one the weights were saved with") from None
    bad = [(k, shape, own[k]) for f in files for k, shape in _tensor_shapes(f).items()
           if k in own and shape != own[k]]
    if not bad:
        return
    vision = config.vision_config
    sizes = ""
    for k, theirs, ours in bad:
        if k.endswith("vision_model.embeddings.position_embedding.weight"):
            extra = ours[0] - (_square(vision.image_size) // vision.patch_size) ** 2  # the class token(s)
            grid = math.isqrt(max(theirs[0] - extra, 0))
            sizes = (f": the weights are for {grid * vision.patch_size} px images ({grid}x{grid} patches of "
                     f"{vision.patch_size} px), config.json says image_size {vision.image_size}")
            break
        if k.endswith("text_model.embeddings.position_embedding.weight"):
            sizes = f": the weights hold {theirs[0]} text positions, config.json says {ours[0]}"
            break
    k, theirs, ours = bad[0]
    raise BackboneError(f"{label or folder}: the weights do not fit its config.json ({len(bad)} tensor(s) of another "
                        f"shape, first {k}: {theirs} in the weights, {ours} for the {cls.__name__} config.json "
                        f"describes){sizes}; use the config.json the weights were saved with")


def _square(size: Any) -> int:
    """A vision config's image_size (an int, or a (height, width) pair of equal sides) as one side."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise BackboneError(f"vision_config.image_size {list(size)} is not square: blocklora feeds square images")
        size = size[0]
    return int(size)


def _activation(config, spec: str, request: str, recorded: bool | None) -> Activation:
    """The towers' hidden_act as QuickGELU or not, after the request; sets it on `config`."""
    towers = (config.text_config, config.vision_config)
    stored = all(t.hidden_act == "quick_gelu" for t in towers)
    act = Activation(stored, f"{spec}/config.json (hidden_act)")
    if recorded is not None and recorded != stored:
        raise AdapterMismatchError(f"the adapter was trained with {'QuickGELU' if recorded else 'GELU'}, but "
                                   f"{act.source} says {towers[0].hidden_act}: pass the model it was trained on")
    if request in ("yes", "no") and (request == "yes") != stored:
        act = Activation(request == "yes", f"--quick-gelu {request} (the config says {towers[0].hidden_act})")
        for t in towers:
            t.hidden_act = "quick_gelu" if act.quick_gelu else "gelu"
    return act
