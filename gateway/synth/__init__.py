"""Seeded synthetic 湖北省 参保人 and 结算 extracts for tests, demos and benchmarks."""

from gateway.synth.generator import CityFiles, generate_city
from gateway.synth.idcard import certno_check_digit, is_valid_certno

__all__ = ["CityFiles", "certno_check_digit", "generate_city", "is_valid_certno"]
