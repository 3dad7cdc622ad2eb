"""Chinese PII detection for ingest: Presidio recognizers, an offline analyzer, a scanner.

Typical use::

    from gateway.ingest.pii import scan_arrow_table, scrub_text

    findings = scan_arrow_table(table, ["diag_note"])  # refuse the load if non-empty
    clean = scrub_text("患者张伟，电话13812345678")     # "患者<PERSON>，电话<CN_MOBILE>"
"""

from gateway.ingest.pii.engine import (
    build_analyzer,
    build_registry,
    default_analyzer,
    register_recognizer,
    registered_entities,
)
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
from gateway.ingest.pii.scanner import (
    DEFAULT_THRESHOLD,
    PiiFinding,
    scan_arrow_table,
    scrub_text,
)

__all__ = [
    "CN_BANK_CARD",
    "CN_ID_CARD",
    "CN_MOBILE",
    "DEFAULT_THRESHOLD",
    "LANGUAGE",
    "PERSON",
    "BankCardRecognizer",
    "ChineseIdCardRecognizer",
    "ChineseMobileRecognizer",
    "ChineseNameRecognizer",
    "PiiFinding",
    "build_analyzer",
    "build_registry",
    "default_analyzer",
    "register_recognizer",
    "registered_entities",
    "scan_arrow_table",
    "scrub_text",
]
