"""Philox-4x32 (Salmon et al., 2011; Random123), the counter-based generator both dropouts use,
written plainly for the tests: on Python ints, or on numpy uint64 arrays holding 32-bit words
(every product of two words fits in 64 bits, so the arithmetic is exact). Checked against
Random123's known-answer vectors in test_embedding.py."""

WORD = 0xFFFFFFFF


def philox4x32(counter, key, rounds=10):
    """The four output words for a 4-word ``counter`` and a 2-word ``key`` after ``rounds`` rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & WORD, p1 & WORD, ((p0 >> 32) ^ c3 ^ k1) & WORD, p0 & WORD
        k0, k1 = (k0 + 0x9E3779B9) & WORD, (k1 + 0xBB67AE85) & WORD
    return c0, c1, c2, c3
