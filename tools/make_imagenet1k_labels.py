"""Regenerate ``imagenet1k_labels.json`` from timm's bundled ImageNet metadata (run once, by hand).

The toolkit ships the JSON so that writing an HF ``config.json`` with real class names needs no timm at run
time. Usage: ``python -m tools.make_imagenet1k_labels`` from the repository root, in an environment with timm.
"""

from __future__ import annotations

import json
from pathlib import Path


def main() -> None:
    from convnextv2.converters.runners.peers import import_timm

    import_timm()
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    count = info.num_classes()
    data = {
        "source": "timm.data.ImageNetInfo (imagenet_synsets.txt, imagenet_synset_to_lemma.txt)",
        "synsets": [info.index_to_label_name(i) for i in range(count)],
        "descriptions": [info.index_to_description(i) for i in range(count)],
    }
    out = Path(__file__).resolve().parents[1] / "converters" / "data" / "imagenet1k_labels.json"
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({count} classes)")


if __name__ == "__main__":
    main()
