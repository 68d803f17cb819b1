"""``model.adaptor_name`` as TAO takes it -> the RADIO teacher whose head and text tower Radio-CLIP uses.

TAO 7.0.1 (``multimodal/clip/model/builders.py``) accepts: null (the version's default adaptor),
``siglip`` (resolved per version: ``siglip2-g`` for c-radio_v3-h, ``siglip2`` for -b/-l/-g), ``clip`` and
its aliases ``dfn`` / ``dfn_clip``, and the internal RADIO names ``siglip2`` / ``siglip2-g``.

With a checkpoint the name is resolved against the checkpoint's own teacher list (``args.teachers``),
so a file whose SigLIP2 teacher is named differently still works; without one, against the type's
published teachers. RADIO finds an adaptor by teacher *name* and picks its summary token at
``teacher.get('token_slot', index)`` (slot 0 when the checkpoint has a single class token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from clip_tao.errors import ModelError

log = logging.getLogger(__name__)

TAO_ALIASES = {"dfn": "clip", "dfn_clip": "clip"}
TAO_NAMES = ("siglip", "clip", "dfn", "dfn_clip", "siglip2", "siglip2-g")
# Teacher types that come with a text tower (RADIO's SigLIP2Adaptor and OpenCLIP_RADIO).
TEXT_TEACHER_TYPES = ("siglip2", "open_clip")


@dataclass(frozen=True)
class Adaptor:
    """The chosen teacher: its name (the head's key), position in ``args.teachers``, type and token slot."""

    name: str
    index: int
    teacher: dict[str, Any]
    token_slot: int

    @property
    def type(self) -> str:
        return self.teacher.get("type", "")


def resolve_adaptor(
    requested: str | None,
    teachers: list[dict[str, Any]],
    default_name: str,
    cls_token_per_teacher: bool,
    where: str,
    recorded_slots: dict[str, int] | None = None,
) -> Adaptor:
    """The teacher ``requested`` names (TAO's names, RADIO's teacher names); one clear error otherwise.

    ``default_name`` is TAO's per-version adaptor (null and ``siglip`` resolve to it when it is a teacher);
    ``recorded_slots`` are token slots a Hugging Face config stores per adaptor (they win over the args).
    """
    names = [t.get("name", "") for t in teachers]
    listing = ", ".join(f"{t.get('name')} ({t.get('type')})" for t in teachers) or "none"
    wanted = TAO_ALIASES.get(requested or "", requested)
    if not wanted:
        index = _siglip_teacher(teachers, default_name, where, listing)
        how = f"model.adaptor_name is null: the version's default adaptor {names[index]!r}"
    elif wanted == "siglip":
        index = _siglip_teacher(teachers, default_name, where, listing)
        how = f"model.adaptor_name='siglip' resolved to {names[index]!r}"
    elif wanted in names:
        index = names.index(wanted)  # RADIO takes the first teacher of that name
        how = f"model.adaptor_name={requested!r} -> teacher {wanted!r}"
    else:
        alias = f" (TAO's alias of {wanted!r})" if wanted != requested else ""
        raise ModelError(
            f"model.adaptor_name={requested!r}{alias} is not a teacher of {where}; its teachers: {listing} "
            f"(TAO's names: siglip, clip, dfn, dfn_clip)"
        )
    teacher = teachers[index]
    if teacher.get("type") not in TEXT_TEACHER_TYPES:
        raise ModelError(
            f"model.adaptor_name={requested!r}: teacher {names[index]!r} of {where} is a {teacher.get('type')} "
            f"teacher without a text tower; Radio-CLIP needs a siglip2 or open_clip teacher (its teachers: {listing})"
        )
    name = names[index]
    if recorded_slots and name in recorded_slots:
        slot = recorded_slots[name]
    elif cls_token_per_teacher:
        slot = int(teacher.get("token_slot", index))
    else:
        slot = 0
    log.info(
        "Radio-CLIP adaptor: %s (teacher %d of %s, type %s, token slot %d)",
        how,
        index,
        where,
        teacher.get("type"),
        slot,
    )
    return Adaptor(name=name, index=index, teacher=dict(teacher), token_slot=slot)


def _siglip_teacher(teachers: list[dict[str, Any]], default_name: str, where: str, listing: str) -> int:
    """TAO's per-version SigLIP2 adaptor when it is a teacher, else the only SigLIP2-type teacher."""
    names = [t.get("name") for t in teachers]
    if default_name in names:
        return names.index(default_name)
    siglip = [i for i, t in enumerate(teachers) if t.get("type") == "siglip2"]
    if len(siglip) == 1:
        return siglip[0]
    if not siglip:
        raise ModelError(f"{where} has no SigLIP2 teacher for the siglip adaptor; its teachers: {listing}")
    raise ModelError(
        f"{where} has {len(siglip)} SigLIP2 teachers ({', '.join(names[i] for i in siglip)}): set "
        "model.adaptor_name to one of these names"
    )
