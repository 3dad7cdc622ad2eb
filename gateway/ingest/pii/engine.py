"""Presidio analyzer wiring: a registry of recognizer factories and an offline engine.

Presidio's default ``AnalyzerEngine()`` loads a spaCy model and the English predefined
recognizers; neither is wanted (no network, no English). ``build_analyzer`` uses
Presidio's ``NoOpNlpEngine`` (no model, empty NLP artifacts) and a
``RecognizerRegistry`` holding exactly the recognizers registered here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NoOpNlpEngine

from gateway.ingest.pii.recognizers import (
    CN_BANK_CARD,
    CN_ID_CARD,
    CN_MOBILE,
    LANGUAGE,
    PERSON,
    BankCardRecognizer,
    ChineseIdCardRecognizer,
    ChineseMobileRecognizer,
    ChineseNameRecognizer,
)

__all__ = [
    "LANGUAGE",
    "RecognizerFactory",
    "build_analyzer",
    "build_registry",
    "default_analyzer",
    "register_recognizer",
    "registered_entities",
]


class RecognizerFactory(Protocol):
    """Builds one recognizer for a language; the unit the registry stores."""

    def __call__(self, supported_language: str) -> EntityRecognizer: ...


_FACTORIES: dict[str, RecognizerFactory] = {}


def register_recognizer(entity: str, factory: RecognizerFactory) -> None:
    """Register (or replace) the recognizer factory for an entity type.

    Only analyzers built afterwards see the change.
    """
    _FACTORIES[entity] = factory


def registered_entities() -> list[str]:
    """Entity types an analyzer from ``build_analyzer`` can report."""
    return sorted(_FACTORIES)


register_recognizer(CN_ID_CARD, ChineseIdCardRecognizer)
register_recognizer(CN_MOBILE, ChineseMobileRecognizer)
register_recognizer(CN_BANK_CARD, BankCardRecognizer)
register_recognizer(PERSON, ChineseNameRecognizer)


def build_registry(
    entities: Iterable[str] | None = None, *, language: str = LANGUAGE
) -> RecognizerRegistry:
    """A registry with our recognizers only (all, or those for ``entities``)."""
    wanted = registered_entities() if entities is None else list(entities)
    unknown = sorted(set(wanted) - set(_FACTORIES))
    if unknown:
        raise ValueError(f"no recognizer registered for {unknown}")
    recognizers = [_FACTORIES[e](supported_language=language) for e in wanted]
    # Passing recognizers up front matters: an empty registry makes AnalyzerEngine load
    # Presidio's predefined (English) recognizers.
    return RecognizerRegistry(recognizers=recognizers, supported_languages=[language])


def build_analyzer(
    entities: Iterable[str] | None = None, *, language: str = LANGUAGE
) -> AnalyzerEngine:
    """An offline ``AnalyzerEngine`` with our Chinese recognizers and no NLP model."""
    nlp_engine = NoOpNlpEngine(models=[{"lang_code": language, "model_name": "none"}])
    return AnalyzerEngine(
        registry=build_registry(entities, language=language),
        nlp_engine=nlp_engine,
        supported_languages=[language],
    )


_default: AnalyzerEngine | None = None
_default_lock = threading.Lock()


def default_analyzer() -> AnalyzerEngine:
    """A process-wide analyzer, built on first use (construction costs ~ms, not µs)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = build_analyzer()
    return _default
