"""Chinese PII recognizers for Presidio: 身份证号, mobile numbers, bank cards, names.

All recognizers are local and offline. The three number recognizers are regex patterns
with a validator; the name recognizer is a dictionary scorer (see ``lexicon``).
Digit-run boundaries use lookarounds, not ``\\b``: in Unicode regexes CJK characters are
word characters, so ``\\b`` finds no boundary in "身份证420102…已核验".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from presidio_analyzer import (
    AnalysisExplanation,
    LocalRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerResult,
)

from gateway.ingest.pii import lexicon
from gateway.ingest.pii.checksums import is_valid_id_card, luhn_valid

if TYPE_CHECKING:
    from presidio_analyzer.nlp_engine import NlpArtifacts

__all__ = [
    "BankCardRecognizer",
    "ChineseIdCardRecognizer",
    "ChineseMobileRecognizer",
    "ChineseNameRecognizer",
    "NameCandidate",
]

LANGUAGE: Final = "zh"

CN_ID_CARD: Final = "CN_ID_CARD"
CN_MOBILE: Final = "CN_MOBILE"
CN_BANK_CARD: Final = "CN_BANK_CARD"
PERSON: Final = "PERSON"


class ChineseIdCardRecognizer(PatternRecognizer):
    """18-character 居民身份证号 (GB 11643-1999), checksum, birth date and region checked.

    Legacy 15-digit numbers (no checksum) are not reported: without a check digit they
    are indistinguishable from ordinary codes.
    """

    # Not preceded by a digit; not followed by a digit or X, so the 18 characters are
    # the whole run. The validator rejects everything that is not a real-looking ID.
    PATTERN: Final = r"(?<![0-9])[1-8][0-9]{16}[0-9Xx](?![0-9Xx])"

    def __init__(self, supported_language: str = LANGUAGE) -> None:
        super().__init__(
            supported_entity=CN_ID_CARD,
            name="ChineseIdCardRecognizer",
            supported_language=supported_language,
            patterns=[Pattern("cn_id_card_18", self.PATTERN, 0.3)],
            context=["身份证", "证件号", "公民身份号码", "certno"],
        )

    def validate_result(self, pattern_text: str) -> bool:
        # True lifts the score to 1.0, False drops the match (Presidio convention).
        return is_valid_id_card(pattern_text.upper())


# Mainland mobile prefixes in use: 13x, 145-149, 15x (not 154), 162/165/166/167,
# 170-178, 18x, 19x (not 194).
_MOBILE_PREFIX = r"1(?:3[0-9]|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8[0-9]|9[0-35-9])"


class ChineseMobileRecognizer(PatternRecognizer):
    """11-digit mainland mobile number, optionally +86/0086/86 and 3-4-4 separators."""

    # Letters count as part of the run on both sides, so codes such as H13010200001
    # (a 定点医药机构 code) are not taken for phone numbers. The separator, if any,
    # must be the same twice (backreference).
    PATTERN: Final = (
        r"(?<![0-9A-Za-z+])(?:(?:\+|00)?86[ -]?)?"
        + _MOBILE_PREFIX
        + r"(?:[0-9]{8}|([ -])[0-9]{4}\1[0-9]{4})(?![0-9A-Za-z])"
    )

    def __init__(self, supported_language: str = LANGUAGE) -> None:
        super().__init__(
            supported_entity=CN_MOBILE,
            name="ChineseMobileRecognizer",
            supported_language=supported_language,
            # No checksum exists, but the prefix table and the exact length make a
            # random 11-digit run unlikely to match: high enough to refuse at 0.6.
            patterns=[Pattern("cn_mobile", self.PATTERN, 0.75)],
            context=["电话", "手机", "联系方式", "tel", "mobile"],
        )


# Issuer prefixes: UnionPay 62 (and the older 60 domestic debit range), Visa 4,
# Mastercard 51-55 and 2221-2720, JCB 35.
_CARD_PREFIXES: Final = (
    "62", "60", "4", "51", "52", "53", "54", "55", "22", "23", "24", "25", "26", "27", "35",
)  # fmt: skip


class BankCardRecognizer(PatternRecognizer):
    """16-19 digit payment card number, Luhn-checked, contiguous or in groups of four."""

    PATTERN: Final = (
        r"(?<![0-9A-Za-z])"
        r"(?:[0-9]{16,19}|[0-9]{4}(?:([ -])[0-9]{4}(?:\1[0-9]{4}){2})(?:\1?[0-9]{1,3})?)"
        r"(?![0-9A-Za-z])"
    )

    def __init__(self, supported_language: str = LANGUAGE) -> None:
        super().__init__(
            supported_entity=CN_BANK_CARD,
            name="BankCardRecognizer",
            supported_language=supported_language,
            patterns=[Pattern("bank_card", self.PATTERN, 0.3)],
            context=["银行卡", "卡号", "账号", "card"],
        )

    def validate_result(self, pattern_text: str) -> bool:
        digits = pattern_text.replace(" ", "").replace("-", "")
        if not 16 <= len(digits) <= 19 or not digits.startswith(_CARD_PREFIXES):
            return False
        # A valid 身份证号 is reported by its own recognizer; never twice.
        if len(digits) == 18 and is_valid_id_card(digits):
            return False
        return luhn_valid(digits)


@dataclass(frozen=True, slots=True)
class NameCandidate:
    """A scored name span; kept internal to the recognizer and its tests."""

    start: int
    end: int
    score: float
    reason: str
    context: bool = False


class ChineseNameRecognizer(LocalRecognizer):
    """Chinese personal names by dictionary: surname + one or two given-name characters.

    Base score of a candidate (ingest refuses at 0.6):
    - the given name is a known given name (王秀英, 张伟): 0.85
    - the given name uses only common name characters: 0.5
    - any other Han characters: 0.35
    Adjustments, first that applies:
    - a context word right before (患者张伟, 姓名：王芳) or 先生/女士 right after:
      +0.35 for known/name-like, +0.15 for the rest
    - the candidate is the whole value (a cell holding 王秀英): +0.15 below known
    - glued to a preceding Han character that is not a typical word before a name
      (子宫平滑肌瘤 → 宫平): -0.35, since a name rarely continues another word
    Compound surnames get +0.1. Common words that look like names (沈阳, 文明) count
    only alone in a value or after a context word. A given part containing a medical or function
    character (血, 病, 管, 于…) is never a candidate, so 高血压 or 支气管哮喘 cannot reach
    0.6 however they are phrased.
    """

    NAME: Final = "ChineseNameRecognizer"
    KNOWN_SCORE: Final = 0.85
    NAME_LIKE_SCORE: Final = 0.5
    WEAK_SCORE: Final = 0.35
    STRONG_CONTEXT_BONUS: Final = 0.35
    WEAK_CONTEXT_BONUS: Final = 0.15
    WHOLE_VALUE_BONUS: Final = 0.15
    MID_WORD_PENALTY: Final = 0.35
    COMPOUND_BONUS: Final = 0.1

    def __init__(self, supported_language: str = LANGUAGE) -> None:
        super().__init__(
            supported_entities=[PERSON],
            name=self.NAME,
            supported_language=supported_language,
            # Presidio's own enhancer can only use context passed to analyze() (no
            # tokens without a spaCy model); in-text context is handled here.
            context=list(lexicon.BEFORE_CONTEXT + lexicon.AFTER_CONTEXT),
        )
        self._surname_starts = frozenset(
            s[0] for s in lexicon.SINGLE_SURNAMES | lexicon.COMPOUND_SURNAMES
        )

    def load(self) -> None:
        """Nothing to load: the lexicon is imported with the module."""

    def analyze(
        self,
        text: str,
        entities: list[str],
        nlp_artifacts: NlpArtifacts | None = None,
    ) -> list[RecognizerResult]:
        if entities and PERSON not in entities:
            return []
        results = []
        for cand in self.find_candidates(text):
            explanation = AnalysisExplanation(
                recognizer=self.NAME,
                original_score=cand.score,
                textual_explanation=cand.reason,
            )
            results.append(
                RecognizerResult(
                    entity_type=PERSON,
                    start=cand.start,
                    end=cand.end,
                    score=cand.score,
                    analysis_explanation=explanation,
                    recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.NAME,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                        # Context was already applied here; stop Presidio adding it again.
                        RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY: cand.context,
                    },
                )
            )
        return results

    def find_candidates(self, text: str) -> list[NameCandidate]:
        """Best non-overlapping name candidates in ``text``, highest score first."""
        found: list[NameCandidate] = []
        starts = self._surname_starts
        for i, ch in enumerate(text):
            if ch not in starts:
                continue
            two = text[i : i + 2]
            if two in lexicon.COMPOUND_SURNAMES:
                cand = self._score_at(text, i, 2)
                if cand is not None:
                    found.append(cand)
            if ch in lexicon.SINGLE_SURNAMES:
                cand = self._score_at(text, i, 1)
                if cand is not None:
                    found.append(cand)
        # Greedy: the strongest reading of each stretch of text wins (欧阳娜娜 as one
        # compound-surname name rather than 欧 + 阳娜).
        found.sort(key=lambda c: (-c.score, -(c.end - c.start), c.start))
        chosen: list[NameCandidate] = []
        for cand in found:
            if all(cand.end <= c.start or cand.start >= c.end for c in chosen):
                chosen.append(cand)
        return chosen

    def _score_at(self, text: str, start: int, surname_len: int) -> NameCandidate | None:
        surname = text[start : start + surname_len]
        j = start + surname_len
        n = len(text)
        givens: list[str] = []
        for k in (j, j + 1):
            if k >= n or not lexicon.is_han(text[k]) or text[k] in lexicon.NOT_NAME_GIVEN_CHARS:
                break
            givens.append(text[j : k + 1])
        if not givens:
            return None

        best: tuple[float, int, str] | None = None
        for given in givens:
            end = j + len(given)
            if end < n and text[end] in lexicon.NOT_NAME_FOLLOWERS:
                continue
            base, reason = self._given_score(given)
            key = (base, len(given), reason)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            return None
        score, given_len, reason = best
        end = j + given_len
        strong = score >= self.NAME_LIKE_SCORE
        whole = text[:start].strip() == "" and text[end:].strip() == ""
        context = self._has_context(text, start, end)
        # 沈阳, 文明, 安静 are words in running text; alone in a cell or right after 患者
        # they may well be a person (高明, 白云 are real names). Missing a name costs
        # more than over-redacting 患者安静, so only bare running text drops them.
        if surname + givens[0] in lexicon.NOT_NAME_WORDS and not (whole or context):
            return None

        if context:
            score += self.STRONG_CONTEXT_BONUS if strong else self.WEAK_CONTEXT_BONUS
            reason += "+context"
        elif whole:
            if score < self.KNOWN_SCORE:
                score += self.WHOLE_VALUE_BONUS
                reason += "+whole"
        elif (
            start > 0
            and lexicon.is_han(text[start - 1])
            and text[start - 1] not in lexicon.NAME_PRECEDERS
        ):
            score -= self.MID_WORD_PENALTY
            reason += "-midword"
        if surname_len == 2:
            score += self.COMPOUND_BONUS
        return NameCandidate(start, end, round(min(score, 1.0), 4), reason, context)

    def _given_score(self, given: str) -> tuple[float, str]:
        if given in lexicon.KNOWN_GIVEN_NAMES:
            return self.KNOWN_SCORE, "known given name"
        # 娜娜, 明明, 芳芳: a known one-character name extended by a name character.
        if (
            len(given) == 2
            and given[0] in lexicon.KNOWN_GIVEN_NAMES
            and given[1] in lexicon.NAME_CHARS
        ):
            return self.KNOWN_SCORE, "known given name, extended"
        if all(c in lexicon.NAME_CHARS for c in given):
            return self.NAME_LIKE_SCORE, "name characters"
        return self.WEAK_SCORE, "surname + han"

    def _has_context(self, text: str, start: int, end: int) -> bool:
        if any(text.startswith(word, end) for word in lexicon.AFTER_CONTEXT):
            return True
        # Only a context word directly before counts (separators and one linking
        # character such as 为/是 may sit between): "患者帕金森病" must not make 金森 a name.
        i = start
        while i > 0 and start - i < 3 and text[i - 1] in lexicon.CONTEXT_SEPARATORS:
            i -= 1
        head = text[:i]
        if head.endswith(lexicon.BEFORE_CONTEXT):
            return True
        return (
            bool(head)
            and head[-1] in lexicon.CONTEXT_LINKS
            and head[:-1].endswith(lexicon.BEFORE_CONTEXT)
        )
