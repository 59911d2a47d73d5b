"""What `blocklora export` writes for each model family: one table, read by the export itself (a folder-only family
refuses a file-like --output) and by `export --help`. Light on purpose: the CLI builds its help from it without
importing any model library.

Every export also carries what it takes to classify (class names, prompt template, logit scale and bias, loss,
resolved MLP activation): as JSON in a blocklora_classifier.json beside the weights in a folder, and in the
safetensors metadata or the torch file's "blocklora_export" dict (key blocklora.classifier) of a single file.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSIFIER_FILE = "blocklora_classifier.json"
CLASSIFIER_KEY = "blocklora.classifier"


@dataclass(frozen=True)
class ExportForm:
    family: str
    folder_only: bool  # True: --output is a folder; a name with a suffix (merged.safetensors) is refused
    files: str  # what it writes, for the help and the errors


_OPEN_CLIP = ("NAME.safetensors or NAME.pt: one state dict file for open_clip.create_model(..., pretrained=FILE), the "
              "classifier in its metadata; NAME without a suffix: open_clip's local-dir folder (open_clip_config.json, "
              f"open_clip_model.safetensors, {CLASSIFIER_FILE}, and the tokenizer when it comes from a hub)")
_TRANSFORMERS = ("a save_pretrained folder (config.json with id2label/label2id, model.safetensors, the tokenizer, "
                 f"the image processor's preprocessor_config.json / processor_config.json, {CLASSIFIER_FILE})")
_EFFNET = ("a folder: visual.safetensors (EfficientNet-Lite0 with its projection), text/ (a stock BertModel and its "
           f"tokenizer), effnet_minilm.json, {CLASSIFIER_FILE}")
FORMS = {
    "open_clip": ExportForm("open_clip", False, _OPEN_CLIP),
    "transformers": ExportForm("transformers", True, _TRANSFORMERS),
    "effnet-minilm": ExportForm("effnet-minilm", True, _EFFNET),
}


def export_form(model: str) -> ExportForm:
    """The export form of a --model string (the same mapping as backbones.load_backbone)."""
    if model.startswith("hf:"):
        return FORMS["transformers"]
    return FORMS["effnet-minilm" if model == "effnet-minilm" else "open_clip"]


def export_description() -> str:
    """`blocklora export --help`'s description: what every export carries, and what each family writes."""
    import textwrap

    intro = ("Merge the adapter into the frozen weights and write them in the model family's own format, loadable "
             "without blocklora. Every export carries the class names, template, logit scale and MLP activation: in "
             f"the file's metadata, or in {CLASSIFIER_FILE} in a folder. What each family writes:")
    families = [textwrap.fill(f"{f.family}: {f.files}", 100, initial_indent="  ", subsequent_indent="    ",
                              break_on_hyphens=False) for f in FORMS.values()]
    return "\n".join([textwrap.fill(intro, 100), *families])
