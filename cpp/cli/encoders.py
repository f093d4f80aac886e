"""``cpp encoders``: list the registered encoders and what ``auto`` picks here."""

from __future__ import annotations

import argparse

from cpp.errors import CppError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("encoders", help="list the available encoders")
    parser.add_argument(
        "--open-clip",
        action="store_true",
        help="also list open_clip pretrained tags and whether they are cached",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cpp.encoders import list_encoders
    from cpp.encoders.auto import auto_choice
    from cpp.encoders.open_clip import resolve_weights
    from cpp.encoders.registry import encoder_factory
    from cpp.encoders.views import FLIP_VIEWS

    for name in list_encoders():
        doc = (encoder_factory(name).__doc__ or "").strip().splitlines()
        print(f"{name:<20} {doc[0] if doc else ''}")
    example = f"effnet-lite0-in1k{FLIP_VIEWS}"
    print(f"\nany spec{FLIP_VIEWS} (e.g. {example}): each image's features averaged with its mirror image's")
    print(f"auto resolves here to: {auto_choice()}")
    if args.open_clip:
        import open_clip

        print("\nopen_clip pretrained (arch/tag, cached):")
        for arch, tag in open_clip.list_pretrained():
            try:
                resolve_weights(arch, tag, allow_download=False)
                cached = "cached"
            except CppError:
                cached = "-"
            print(f"  open_clip:{arch}/{tag:<40} {cached}")
    return 0
