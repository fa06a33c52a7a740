"""Korean PII detection: a generated, labelled set of realistic sentences, scored per type.

The generator writes values in the formats people actually type (hyphens, dots, spaces, +82, masked RRNs,
the 2021 passport format) into Korean and English sentence templates, and mixes in sentences full of
numbers that are *not* personal data (dates, prices, order and tracking numbers, versions, times, year
ranges, business registration numbers, product codes, ISBNs). Recall and precision are computed per type on
exact spans: a detection counts only if it covers exactly the labelled value with the right type.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kfoundry.data.curate.pii import PII_TYPES, find_pii, luhn_ok, placeholder, redact, rrn_checksum_ok

N_PER_TYPE = 300


# ---------------------------------------------------------------------------------------------------------
# Value generators


def _rrn(rng: random.Random) -> str:
    yy, mm = rng.randrange(100), rng.randint(1, 12)
    dd = rng.randint(1, 28)
    g = rng.choice("1234") if rng.random() < 0.85 else rng.choice("5678")
    body = f"{yy:02d}{mm:02d}{dd:02d}{g}" + "".join(rng.choice("0123456789") for _ in range(5))
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    check = (11 - sum(int(d) * w for d, w in zip(body, weights)) % 11) % 10
    full = body + str(check)
    style = rng.random()
    if style < 0.6:
        return f"{full[:6]}-{full[6:]}"
    if style < 0.75:
        return f"{full[:6]}-{full[6]}******"  # masked
    if style < 0.85:
        return f"{full[:6]} - {full[6:]}"
    return full  # bare 13 digits, valid checksum


def _phone(rng: random.Random) -> str:
    sep = rng.choice(["-", "-", "-", ".", " ", ""])
    kind = rng.random()
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if kind < 0.5:
        return sep.join([rng.choice(["010", "010", "011", "016", "017", "019"]), d(4), d(4)])
    if kind < 0.62:
        return f"+82-10-{d(4)}-{d(4)}" if rng.random() < 0.5 else f"+82 10 {d(4)} {d(4)}"
    if kind < 0.75:
        s = sep if sep else "-"
        return s.join(["02", d(rng.choice([3, 4])), d(4)])
    if kind < 0.85:
        s = sep if sep else "-"
        return s.join([rng.choice(["031", "032", "042", "051", "053", "062", "064", "070"]), d(3), d(4)])
    if kind < 0.92:
        return f"({rng.choice(['02', '031', '051'])}) {d(3)}-{d(4)}"
    return f"{rng.choice(['1588', '1577', '1544', '1661', '1899'])}-{d(4)}"


def _email(rng: random.Random) -> str:
    user = rng.choice(["kim", "lee.park", "hong_gildong", "minji92", "dev+news", "j.choi"]) + str(rng.randrange(1000))
    domains = ["naver.com", "daum.net", "hanmail.net", "kakao.com", "gmail.com", "snu.ac.kr", "korea.go.kr"]
    return f"{user}@{rng.choice(domains)}"


def _card(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.15:  # Amex 15 digits
            body = "3" + rng.choice("47") + "".join(rng.choice("0123456789") for _ in range(12))
        else:
            body = rng.choice("45") + "".join(rng.choice("0123456789") for _ in range(14))
        for c in "0123456789":
            if luhn_ok(body + c):
                digits = body + c
                break
        if len(digits) == 15:
            return f"{digits[:4]}-{digits[4:10]}-{digits[10:]}" if rng.random() < 0.7 else digits
        sep = rng.choice(["-", "-", " ", ""])
        return sep.join(digits[i:i + 4] for i in range(0, 16, 4))


def _account(rng: random.Random) -> tuple[str, str]:
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    bank, groups = rng.choice([("국민은행", (6, 2, 6)), ("신한은행", (3, 3, 6)), ("우리은행", (4, 3, 6)),
                               ("하나은행", (3, 6, 5)), ("농협", (3, 4, 4, 2)), ("기업은행", (3, 6, 2, 3)),
                               ("카카오뱅크", (4, 2, 7)), ("토스뱅크", (4, 4, 4))])
    value = "-".join(d(n) for n in groups)
    if rng.random() < 0.15:
        value = value.replace("-", "")
    return bank, value


def _passport(rng: random.Random) -> str:
    d = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    return f"M{d(8)}" if rng.random() < 0.6 else f"M{d(3)}{rng.choice('ABCDEFGHJK')}{d(4)}"


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    if rng.random() < 0.5:  # full form, eight groups
        return "2001:db8:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(6))
    return "2001:db8:" + ":".join(f"{rng.randrange(1, 65536):x}" for _ in range(rng.choice([2, 3]))) + "::1"


TEMPLATES = {
    "rrn": ["주민등록번호: {v}", "제 주민번호는 {v}입니다.", "신청서에 주민등록번호({v})를 적어 주세요.",
            "외국인등록번호 {v} 확인 부탁드립니다.", "본인 확인용 {v} 기재 완료", "RRN {v} on file."],
    "phone": ["문의는 {v}로 연락 주세요.", "전화번호: {v}", "담당자 휴대폰 {v} (평일 9시~6시)",
              "Call us at {v} anytime.", "배송 기사님 번호 {v} 입니다", "고객센터 {v}"],
    "email": ["이메일 {v}로 보내주세요.", "문의: {v}", "Contact {v} for details.", "제 메일은 {v}입니다",
              "({v})로 지원서를 제출하세요."],
    "card": ["카드번호 {v} 로 결제했습니다.", "결제 카드: {v}", "Card number {v} was charged.",
             "신용카드({v}) 할부 3개월"],
    "account": ["{bank} {v} (예금주 홍길동)으로 입금해 주세요.", "입금 계좌: {bank} {v}",
                "환불은 {bank} 계좌 {v}로 부탁드립니다.", "{bank} 계좌번호 {v} 입니다"],
    "passport": ["여권번호 {v}로 예약되어 있습니다.", "여권 번호: {v}", "Passport No. {v}",
                 "출국 시 여권({v})을 지참하세요."],
    "ip": ["접속 IP는 {v}입니다.", "서버 주소 {v} 에서 오류가 발생했습니다.", "Blocked IP: {v}",
           "로그에 {v} 주소가 반복해서 나타납니다."],
}

NEGATIVES = [
    "2024-01-15에 배송이 시작되었습니다.", "가격은 12,345,678원이며 부가세 포함입니다.",
    "주문번호 2024011512345678 로 조회하세요.", "송장번호 6012-3456-7890 확인 바랍니다.",
    "버전 1.2.3.4 이상에서 지원됩니다.", "v10.0.19041.1 업데이트 완료", "회의는 10:30:00에 시작합니다.",
    "임진왜란(1592-1598) 당시의 기록이다.", "1950-1953년 한국전쟁", "사업자등록번호 123-45-67890",
    "모델명 SM-G991N, 제품코드 M12345678", "ISBN 978-89-01-23456-7", "우편번호 06236, 서울 강남구",
    "3.14159265358979 는 원주율입니다.", "전체 20,000명 중 1,234명이 참석했다.", "2023.12.31 기준 잔액",
    "조문 제1조 ① 대한민국은 민주공화국이다.", "좌표 37.5665, 126.9780", "점수는 95.5점, 순위 3/120",
    "Order #123-456-7890123 shipped.", "The meeting is at 14:00 on 2024-03-05.",
    "오늘 기분 최고 😀🎉 Let's go!", "접수번호 20240115-000123", "학번 2019123456 학생",
    "KTX 열차번호 101, 좌석 12A", "시리얼 번호 AB12-CD34-EF56", "1588번 버스를 타세요",
    "19-25세 청년 대상", "모집 인원 010명 (오타)", "ver 2.0.1.3 배포", "람보1.2.3.4 씨리즈 다 봤다",
    "해리포터 1.2.3.4편 정주행",
]


def labelled_set(seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """(sentence, [(type, value)]) pairs: N_PER_TYPE per type plus every negative sentence twice."""
    rng = random.Random(seed)
    gens = {"rrn": _rrn, "phone": _phone, "email": _email, "card": _card, "passport": _passport, "ip": _ip}
    items = []
    for kind in PII_TYPES:
        for _ in range(N_PER_TYPE):
            tpl = rng.choice(TEMPLATES[kind])
            if kind == "account":
                bank, value = _account(rng)
                text = tpl.format(bank=bank, v=value)
            else:
                value = gens[kind](rng)
                text = tpl.format(v=value)
            # a distractor sentence around it, half of the time
            if rng.random() < 0.5:
                text = rng.choice(NEGATIVES) + " " + text
            items.append((text, [(kind, value)]))
    items += [(neg, []) for neg in NEGATIVES * 2]
    rng.shuffle(items)
    return items


def score(items) -> dict[str, dict[str, float]]:
    tp, fp, fn = Counter(), Counter(), Counter()
    misses = {}
    for text, gold in items:
        found = {(s.kind, s.text) for s in find_pii(text)}
        gold_set = set(gold)
        for g in gold_set:
            if g in found:
                tp[g[0]] += 1
            else:
                fn[g[0]] += 1
                misses.setdefault(g[0], []).append(text)
        for f in found - gold_set:
            fp[f[0]] += 1
            misses.setdefault("fp_" + f[0], []).append((text, f[1]))
    out = {}
    for kind in PII_TYPES:
        out[kind] = {"recall": tp[kind] / max(1, tp[kind] + fn[kind]),
                     "precision": tp[kind] / max(1, tp[kind] + fp[kind]), "n": tp[kind] + fn[kind]}
    out["_misses"] = misses
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labelled_set_recall_and_precision_per_type(seed):
    scores = score(labelled_set(seed=seed))
    misses = scores.pop("_misses")
    for kind, s in scores.items():
        assert s["n"] == N_PER_TYPE
        assert s["recall"] >= 0.99, (kind, s, misses.get(kind, [])[:5])
        assert s["precision"] >= 0.95, (kind, s, misses.get("fp_" + kind, [])[:5])


def test_negatives_alone_find_nothing():
    for text in NEGATIVES:
        assert find_pii(text) == [], (text, find_pii(text))


def test_redact_replaces_with_typed_placeholders(mixed_texts):
    text = "홍길동(900101-1234568) 010-1234-5678, hong@naver.com, 국민은행 123456-78-901234 접속 192.168.0.1"
    out, counts = redact(text)
    assert counts == Counter({"rrn": 1, "phone": 1, "email": 1, "account": 1, "ip": 1})
    for kind in counts:
        assert placeholder(kind) in out
    assert "1234568" not in out and "naver.com" not in out and "홍길동(" in out
    for t in mixed_texts:  # ordinary Korean/English/digits/emoji/NFD text is left alone
        assert redact(t) == (t, Counter())


def test_checksums():
    assert rrn_checksum_ok("9001011234568") and not rrn_checksum_ok("9001011234567")
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    # bare 13 digits need the checksum; hyphenated ones (post-2020 numbers have none) do not
    assert [s.kind for s in find_pii("번호 9001011234568")] == ["rrn"]
    assert find_pii("번호 9001011234567") == []
    assert [s.kind for s in find_pii("번호 900101-1234567")] == ["rrn"]
    assert find_pii("번호 901301-1234567") == []  # month 13 is not a date


@pytest.mark.parametrize("text, kind", [
    ("여권 M123A4567 분실", "passport"), ("M12345678", None), ("카카오뱅크 3333-01-1234567", "account"),
    ("3333-01-1234567", None), ("fe80::1ff:fe23:4567:890a 로 접속", "ip"), ("10:30:15", None),
])
def test_context_rules(text, kind):
    kinds = [s.kind for s in find_pii(text)]
    assert kinds == ([kind] if kind else [])
