"""The "Check your understanding" quizzes (transformer_book/quiz.py).

Every chapter ends with one; every question has exactly one right option and an
explanation for each option; the section the right answer links to is a heading of the
chapter, under the id the site gives it; every "what does this print?" answer is what
the code prints when run. The site test (tests/test_site.py) clicks through one quiz in
Chromium and checks that every quiz link lands on an existing anchor.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nbformat
import pytest

from transformer_book import quiz as quiz_module
from transformer_book.quiz import QUIZZES, Question, anchor, check_answers, outcome, quiz

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = {p.name[:2]: p for p in sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))}
QUESTIONS = [(ch, n, q) for ch, qs in QUIZZES.items() for n, q in enumerate(qs, 1)]
IDS = [f"{ch}-q{n}" for ch, n, _ in QUESTIONS]


def headings(path: Path) -> list[str]:
    """The section titles of a notebook's markdown cells, as the site shows them."""
    titles = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"```.*?```", "", cell.source, flags=re.DOTALL)
        for line in text.splitlines():
            match = re.match(r"#{1,6}\s+(.*\S)", line)
            if match:
                titles.append(match.group(1).replace("`", ""))
    return titles


def test_every_chapter_ends_with_its_quiz():
    assert sorted(QUIZZES) == sorted(CHAPTERS), "a chapter without a quiz, or the reverse"
    for chapter, path in CHAPTERS.items():
        cells = nbformat.read(path, as_version=4).cells
        assert cells[-2].cell_type == "markdown"
        assert cells[-2].source.startswith("## Check your understanding"), path.name
        last = cells[-1]
        assert last.cell_type == "code" and f'quiz("{chapter}")' in last.source, path.name
        assert "remove-input" in last.metadata.get("tags", []), path.name


@pytest.mark.parametrize("chapter", sorted(QUIZZES))
def test_each_quiz_has_4_to_6_questions_and_one_that_runs_code(chapter):
    questions = QUIZZES[chapter]
    assert 4 <= len(questions) <= 6
    assert any(q.code for q in questions), "no 'what does this print?' question"
    assert sum(any(o.mistake for o in q.options) for q in questions) >= 2, (
        "fewer than two questions offer a named mistake as a wrong option"
    )


@pytest.mark.parametrize("chapter, number, question", QUESTIONS, ids=IDS)
def test_one_right_option_and_an_explanation_for_each(chapter, number, question):
    options = question.options
    assert 3 <= len(options) <= 6
    assert sum(o.right for o in options) == 1
    assert len({o.text for o in options}) == len(options), "two options read the same"
    for option in options:
        assert option.text.strip() and option.why.strip()
        sentences = re.findall(r"[.!?](?:\s|$)", option.why.strip())
        assert 1 <= len(sentences) <= 2, f"not one or two sentences: {option.why!r}"
        assert not (option.right and option.mistake), "the right answer names a mistake"


@pytest.mark.parametrize("chapter, number, question", QUESTIONS, ids=IDS)
def test_the_right_answer_links_to_a_section_of_the_chapter(chapter, number, question):
    from docutils.nodes import make_id

    titles = headings(CHAPTERS[chapter])
    assert question.section in titles, f"no section {question.section!r} in the chapter"
    assert titles.count(question.section) == 1, "two sections share the title"
    assert anchor(question.section) == make_id(question.section)  # Sphinx's section id
    html = quiz(chapter)._repr_html_()
    assert f'href="#{anchor(question.section)}"' in html


CODE_QUESTIONS = [(ch, n, q) for ch, n, q in QUESTIONS if q.code]


@pytest.mark.parametrize(
    "chapter, number, question", CODE_QUESTIONS, ids=[f"{c}-q{n}" for c, n, _ in CODE_QUESTIONS]
)
def test_predicted_output_is_what_the_code_prints(chapter, number, question):
    printed = outcome(question.code)
    right = [o.text for o in question.options if o.right]
    assert right == [printed]
    wrong = [o.text for o in question.options if not o.right]
    assert printed not in wrong


def test_a_wrong_predicted_output_stops_the_quiz(monkeypatch):
    """Guard: the build-time check fails when the right option is not what is printed."""
    question = next(q for q in QUIZZES["05"] if q.code)
    swapped = tuple(dataclasses.replace(o, right=not o.right) for o in question.options[:2])
    broken = dataclasses.replace(question, options=swapped + question.options[2:])
    monkeypatch.setitem(QUIZZES, "05", (broken,) + QUIZZES["05"][1:])
    with pytest.raises(AssertionError, match="quiz 05, question 1: the right option says"):
        check_answers("05")
    with pytest.raises(AssertionError):
        quiz("05")


def test_outcome_reports_an_exception_as_raises():
    assert outcome("print(1)\nraise ValueError('x')") == "1\nraises ValueError"


def test_unknown_chapter_is_one_sentence():
    with pytest.raises(ValueError, match=r"^there is no quiz for chapter '42'; .*\.$"):
        quiz("42")
    assert quiz(5).chapter == quiz("05").chapter == "05"


def test_html_is_self_contained_and_text_has_no_answers():
    for chapter in QUIZZES:
        shown = quiz(chapter)
        html = shown._repr_html_()
        assert "http" not in html and "src=" not in html  # nothing to fetch
        assert html.count("<script>") == 1 and html.count("<style>") == 1
        assert html.count('data-right="1"') == len(QUIZZES[chapter])
        assert html.count('class="tbq-why"') == sum(len(q.options) for q in QUIZZES[chapter])
        text = repr(shown)
        assert "Right." not in text and all(q.options[0].why not in text for q in QUIZZES[chapter])
    first, second = quiz("01")._repr_html_(), quiz("01")._repr_html_()
    ids = [re.search(r'class="tbq" id="([^"]+)"', h).group(1) for h in (first, second)]
    assert ids[0] != ids[1], "two displays of one quiz on a page must not share an id"


def test_question_fields():
    assert [f.name for f in dataclasses.fields(Question)] == ["ask", "options", "section", "code"]
    assert quiz_module.anchor("1. The other sequences in the batch") == (
        "the-other-sequences-in-the-batch"
    )
