"""Write the embedded sample: a few hundred finance instructions in Finance-Instruct-500k's schema.

    python -m demo.make_sample data/sample/finance_instruct_sample.jsonl

The rows are our own: templated questions whose answers are computed (interest, ratios, growth) or taken
from a glossary we wrote, so the answers follow learnable rules. The schema is the dataset's exactly:
`system`, `user`, `assistant` text columns. As in the real data, most `system` cells are empty or `"\n"`;
the rest carry an analyst persona or the input text a question refers to. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Row = dict[str, str]

GLOSSARY = {
    "liquidity": "the ease with which an asset can be turned into cash without moving its price",
    "a bond's duration": "the weighted average time to receive a bond's cash flows, and a measure of its price "
    "sensitivity to interest rates",
    "diversification": "spreading investments across assets whose returns are not perfectly correlated, "
    "to reduce risk without giving up expected return",
    "a dividend": "a distribution of a company's profits to its shareholders, usually paid in cash",
    "market capitalization": "the share price multiplied by the number of shares outstanding",
    "an index fund": "a fund that holds the securities of a market index to match its return at low cost",
    "inflation": "the rate at which the general level of prices rises, reducing the purchasing power of money",
    "a credit rating": "an agency's assessment of a borrower's ability to repay its debt on time",
    "an option's strike price": "the price at which the holder of an option may buy or sell the underlying asset",
    "short selling": "selling borrowed shares in the hope of buying them back later at a lower price",
    "working capital": "current assets minus current liabilities, the funds available for day-to-day operations",
    "free cash flow": "operating cash flow minus capital expenditures",
    "EBITDA": "earnings before interest, taxes, depreciation and amortization",
    "a yield curve": "a plot of the yields of bonds of equal credit quality against their maturities",
    "quantitative easing": "a central bank buying securities to lower long-term rates and add money to the system",
    "beta": "a measure of how much a stock's returns move with the returns of the market",
    "the Sharpe ratio": "excess return over the risk-free rate divided by the standard deviation of returns",
    "an ETF": "an exchange-traded fund, a pooled investment whose shares trade on an exchange like a stock",
    "a margin call": "a broker's demand for more collateral when an account's equity falls below the maintenance level",
    "goodwill": "the amount paid for an acquisition above the fair value of its identifiable net assets",
    "a covenant": "a condition in a loan agreement that the borrower must meet or avoid",
    "amortization": "spreading the cost of an intangible asset, or the repayment of a loan, over time",
    "a hedge": "a position taken to offset the risk of another position",
    "the time value of money": "the principle that money available now is worth more than the same sum later",
    "a basis point": "one hundredth of a percentage point, or 0.01%",
    "a bear market": "a market in which prices have fallen 20% or more from a recent high",
    "a bull market": "a market in which prices are rising or expected to rise",
    "an annuity": "a series of equal payments made at regular intervals",
    "a mutual fund": "a pooled investment managed by professionals and priced once a day at net asset value",
    "collateral": "an asset a borrower pledges to a lender as security for a loan",
}

PERSONAS = [
    "You are a careful financial analyst. Answer precisely and show the key figure.",
    "You are a CFA charterholder helping a junior colleague.",
    "Answer as a personal finance advisor would, in plain language.",
]

COMPANIES = ["Northwind Traders", "Contoso Ltd", "Fabrikam Inc", "Tailspin Toys", "Litware Corp", "Adatum Bank"]


def money(x: float) -> str:
    """Format a currency amount: `money(1234.5)` -> `'$1,234.50'`."""
    return f"${x:,.2f}"


def compound_interest(rng: random.Random) -> tuple[str, str]:
    principal = rng.choice([1000, 2500, 5000, 10000, 20000, 50000])
    rate = rng.choice([2, 3, 4, 5, 6, 7, 8])
    years = rng.choice([2, 3, 5, 10, 15, 20])
    value = principal * (1 + rate / 100) ** years
    return (
        f"If I invest {money(principal)} at {rate}% interest compounded annually, what will it be worth "
        f"after {years} years?",
        f"The future value is {money(principal)} x (1 + {rate / 100:.2f})^{years} = {money(value)}. "
        f"The investment earns {money(value - principal)} in interest.",
    )


def simple_interest(rng: random.Random) -> tuple[str, str]:
    principal = rng.choice([800, 1200, 3000, 7500, 15000])
    rate = rng.choice([3, 4, 5, 6, 9, 12])
    years = rng.choice([1, 2, 3, 4])
    interest = principal * rate / 100 * years
    return (
        f"How much simple interest does a loan of {money(principal)} at {rate}% per year accrue over {years} years?",
        f"Simple interest is principal x rate x time = {money(principal)} x {rate / 100:.2f} x {years} "
        f"= {money(interest)}.",
    )


def pe_ratio(rng: random.Random) -> tuple[str, str]:
    price = rng.choice([24, 36, 45, 60, 88, 120, 150])
    eps = rng.choice([1.5, 2.0, 3.0, 4.0, 6.0])
    company = rng.choice(COMPANIES)
    return (
        f"{company} trades at {money(price)} per share and earned {money(eps)} per share last year. "
        f"What is its P/E ratio?",
        f"The P/E ratio is price divided by earnings per share: {price} / {eps} = {price / eps:.1f}. "
        f"Investors pay {price / eps:.1f} dollars for each dollar of annual earnings.",
    )


def current_ratio(rng: random.Random) -> tuple[str, str]:
    assets = rng.choice([150, 240, 300, 420, 500])
    liabilities = rng.choice([100, 120, 200, 250, 400])
    ratio = assets / liabilities
    verdict = "can cover" if ratio >= 1 else "cannot cover"
    return (
        f"A firm has current assets of ${assets} million and current liabilities of ${liabilities} million. "
        f"What is its current ratio?",
        f"The current ratio is {assets} / {liabilities} = {ratio:.2f}. The firm {verdict} its short-term "
        f"obligations with its current assets.",
    )


def percent_change(rng: random.Random) -> tuple[str, str]:
    old = rng.choice([40, 55, 80, 100, 125, 200])
    new = rng.choice([30, 50, 90, 110, 150, 260])
    change = (new - old) / old * 100
    direction = "rose" if change >= 0 else "fell"
    return (
        f"A stock moved from {money(old)} to {money(new)}. What is the percentage change?",
        f"The change is ({new} - {old}) / {old} = {change:+.1f}%, so the price {direction} by {abs(change):.1f}%.",
    )


def cagr(rng: random.Random) -> tuple[str, str]:
    start = rng.choice([100, 250, 400, 1000])
    end = start * rng.choice([1.3, 1.5, 1.8, 2.0, 2.5])
    years = rng.choice([3, 4, 5, 8])
    growth = ((end / start) ** (1 / years) - 1) * 100
    return (
        f"Revenue grew from ${start:,.0f} million to ${end:,.0f} million over {years} years. What is the CAGR?",
        f"CAGR = ({end:,.0f} / {start:,.0f})^(1/{years}) - 1 = {growth:.2f}% per year.",
    )


def rule_of_72(rng: random.Random) -> tuple[str, str]:
    rate = rng.choice([3, 4, 6, 8, 9, 12])
    return (
        f"Using the rule of 72, how long does money take to double at {rate}% a year?",
        f"By the rule of 72, money doubles in about 72 / {rate} = {72 / rate:.1f} years.",
    )


def loan_payment(rng: random.Random) -> tuple[str, str]:
    principal = rng.choice([10000, 25000, 200000, 300000])
    annual = rng.choice([3, 4, 5, 6, 7])
    years = rng.choice([5, 15, 30])
    r, n = annual / 100 / 12, years * 12
    payment = principal * r / (1 - (1 + r) ** -n)
    return (
        f"What is the monthly payment on a {money(principal)} loan at {annual}% APR over {years} years?",
        f"With monthly rate {r:.5f} and {n} payments, the payment is P x r / (1 - (1 + r)^-n) = {money(payment)} "
        f"a month, {money(payment * n - principal)} in total interest.",
    )


def current_yield(rng: random.Random) -> tuple[str, str]:
    coupon = rng.choice([3, 4, 5, 6, 7])
    price = rng.choice([900, 950, 1000, 1040, 1100])
    annual = coupon * 10
    return (
        f"A $1,000 bond pays a {coupon}% annual coupon and trades at {money(price)}. What is its current yield?",
        f"The annual coupon is {money(annual)}, so the current yield is {annual} / {price} = "
        f"{annual / price * 100:.2f}%.",
    )


def definition(rng: random.Random) -> tuple[str, str]:
    term = rng.choice(sorted(GLOSSARY))
    phrasing = rng.choice(["What is {t}?", "Explain {t}.", "Define {t} in one sentence.", "What does {t} mean?"])
    name = term[0].upper() + term[1:]
    return phrasing.format(t=term), f"{name} is {GLOSSARY[term]}."


GENERATORS: list[Callable[[random.Random], tuple[str, str]]] = [
    compound_interest,
    simple_interest,
    pe_ratio,
    current_ratio,
    percent_change,
    cagr,
    rule_of_72,
    loan_payment,
    current_yield,
    definition,
    definition,
]


def statement_row(rng: random.Random) -> Row:
    """A row whose `system` cell holds the input text, as many Finance-Instruct rows do."""
    company = rng.choice(COMPANIES)
    revenue = rng.choice([120, 180, 240, 320])
    cost = revenue * rng.choice([0.4, 0.55, 0.6, 0.7])
    margin = (revenue - cost) / revenue * 100
    return {
        "system": f"{company} reported revenue of ${revenue} million and cost of goods sold of ${cost:.0f} million.",
        "user": f"What is {company}'s gross margin?",
        "assistant": f"Gross margin is (revenue - cost of goods sold) / revenue = ({revenue} - {cost:.0f}) / {revenue} "
        f"= {margin:.1f}%.",
    }


def make_rows(n: int, seed: int) -> list[Row]:
    """Return `n` distinct rows in the dataset's schema; the same `seed` gives the same rows."""
    rng = random.Random(seed)
    rows: dict[tuple[str, str], Row] = {}
    while len(rows) < n:
        kind = rng.random()
        if kind < 0.12:
            row = statement_row(rng)
        else:
            user, assistant = rng.choice(GENERATORS)(rng)
            system = "" if kind < 0.55 else "\n" if kind < 0.85 else rng.choice(PERSONAS)
            row = {"system": system, "user": user, "assistant": assistant}
        rows.setdefault((row["user"], row["assistant"]), row)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as f:
        for row in make_rows(args.rows, args.seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.rows} rows to {args.output}")


if __name__ == "__main__":
    main()
