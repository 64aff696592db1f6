"""Ready lesson notebooks for a class: four short lessons that run top to bottom on the
embedded models (SmolLM2-135M and MiniLM-L6), with notes for students between the cells.

    from engine.notebooks.lessons import LESSONS, open_lesson
    book = open_lesson(workbench.notebooks, "next-word")   # a fresh, editable copy
    wait_all(workbench, book.id)                          # every cell, in order

Each ``open_lesson`` call creates a new notebook, so a class can run and edit its copy
without touching the lesson itself. All four together run in well under 5 minutes on two
CPU cores (the fine-tune of lesson 4 takes about half of that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import InputError
from engine.notebooks.book import Notebook, NotebookStore, Ref

LM = "smollm2-135m"  # the embedded causal language model
ENCODER = "minilm-l6"  # the embedded encoder (BERT-style)
PARIS = "The Eiffel Tower is located in the city of"


@dataclass(frozen=True)
class Lesson:
    """One lesson: its id (for ``open_lesson``), title and a one-line summary."""

    id: str
    title: str
    summary: str


LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "next-word",
        "How a language model picks the next word",
        "Tokens, next-token probabilities, and how temperature and top-p change the words "
        "it picks.",
    ),
    Lesson(
        "attention",
        "What attention looks at",
        "Attention maps of a small GPT-style model and a BERT-style encoder: previous-token "
        "heads, the first-token sink, and a long text.",
    ),
    Lesson(
        "why",
        "Why did the model say that?",
        "Which words made the model answer Paris: Integrated Gradients and occlusion, "
        "completeness, faithfulness, and Paris versus London.",
    ),
    Lesson(
        "new-task",
        "Teach a model a new task",
        "Fine-tune MiniLM to tell positive from negative reviews, use it, and explain its "
        "decision.",
    ),
)


class _Builder:
    """Appends cells to one notebook: ``note`` for Markdown, ``cell`` for the rest."""

    def __init__(self, store: NotebookStore, notebook_id: str) -> None:
        self.store, self.id = store, notebook_id

    def note(self, text: str) -> None:
        self.store.add_cell(self.id, "markdown", {"text": text.strip()})

    def cell(self, kind: str, spec: dict, refs: dict[str, Ref] | None = None) -> str:
        return self.store.add_cell(self.id, kind, spec, refs).id


def _next_word(b: _Builder) -> None:
    b.note(
        """
### How a language model picks the next word
A language model does not see words: it sees **tokens**, small pieces of text (a word, part
of a word, a space plus a word). Given the tokens so far, it gives every token in its
vocabulary a **probability** of coming next. Then one token is picked, added to the text, and
the model is asked again. That is all "writing" is for a model.

Press **Run all** (at the top) and read on while the cells run.
"""
    )
    b.note(
        """
#### 1. Greedy: always take the most likely token
The cell below asks SmolLM2 (a small model, 135 million numbers) to continue a sentence,
always choosing the single most probable token (**greedy** decoding).

When it has run, look at the **Tokens** line: each generated token is coloured by the
probability the model gave it (hover over a token to see the other candidates it
considered). Open the **Token table** for the exact numbers. Is the model sure of every
token, or only of some?
"""
    )
    gen = b.cell(
        "generate",
        {
            "model": LM,
            "prompt": "The best thing about learning a new language is",
            "settings": {"max_new_tokens": 16, "greedy": True},
        },
    )
    b.note(
        """
#### 2. Measuring how surprised the model is
**Perplexity** summarises the probabilities: roughly "how many tokens was the model choosing
between, on average". Close to 1 means very sure; large means surprised. The cell below
measures the perplexity of the whole text above (prompt and continuation), reusing it by
reference: if you edit the prompt above, this cell is marked *stale* until you run it again.
"""
    )
    b.cell("evaluate", {"model": LM, "metric": "perplexity"}, {"text": Ref(gen, "full_text")})
    b.note(
        """
#### 3. Temperature and top-p, side by side
Greedy decoding always gives the same text, and it can get dull or repetitive. **Sampling**
picks the next token at random, following the probabilities. Two knobs change those
probabilities first:

- **Temperature** divides the model's scores before they become probabilities. Below 1
  (e.g. 0.7) it sharpens them: likely tokens become even more likely. Above 1 (e.g. 1.5)
  it flattens them: unlikely tokens get picked more often, and the text gets odd.
- **Top-p** (nucleus sampling) keeps only the most likely tokens whose probabilities add up
  to *p* (e.g. 0.5) and samples among those.

The comparison below runs the same model on the same prompt four ways. Each sampled variant
has a fixed **seed**, so the "random" picks are the same every time you run it: change the
seed (edit the cell) to see another draw.
"""
    )
    sampled = {"max_new_tokens": 20, "greedy": False, "top_k": 0, "seed": 7}
    b.cell(
        "compare",
        {
            "prompt": "Once upon a time, in a small village,",
            "settings": {"max_new_tokens": 20, "greedy": True},
            "variants": [
                {
                    "model": LM,
                    "settings": {"max_new_tokens": 20, "greedy": True},
                    "label": "greedy",
                },
                {
                    "model": LM,
                    "settings": {**sampled, "temperature": 0.7, "top_p": 1.0},
                    "label": "temperature 0.7",
                },
                {
                    "model": LM,
                    "settings": {**sampled, "temperature": 1.5, "top_p": 1.0},
                    "label": "temperature 1.5",
                },
                {
                    "model": LM,
                    "settings": {**sampled, "temperature": 1.0, "top_p": 0.5},
                    "label": "top-p 0.5",
                },
            ],
        },
    )
    b.note(
        """
#### 4. Greedy or sampled?
- **Greedy** is repeatable and good for short factual answers, but long greedy texts often
  loop.
- **Temperature 0.7** usually stays sensible while varying the wording.
- **Temperature 1.5** picks unlikely tokens often: the text drifts into nonsense.
- **Top-p 0.5** cuts away the unlikely tail, so even at temperature 1 it stays on topic.

Try it: edit the comparison, change a seed or a temperature, and run that cell again.
"""
    )


LONG_TEXT = (
    "The city library opens at nine in the morning. Students arrive early to find a quiet "
    "table near the windows, where the light is good and the noise from the street is far "
    "away. The librarian, who has worked there for almost thirty years, knows most of them "
    "by name. She remembers which books each of them borrowed last winter and often puts new "
    "titles aside for the ones who read the most. In the afternoon, children come in after "
    "school. They sit on the carpet in the corner while a volunteer reads stories aloud, "
    "changing her voice for every character: a grumpy bear, a clever fox, a sleepy owl who "
    "never finishes a sentence. Parents wait on the benches outside, talking about the "
    "weather, the price of bread and the new bus line that will stop right in front of the "
    "building next spring. When the sun goes down, the reading room slowly empties. The last "
    "visitor is usually an old man who reads the evening newspaper from the first page to the "
    "last, folds it carefully and puts it back on the wooden rack. Then the librarian turns "
    "off the lamps one by one, checks that every window is closed and locks the heavy door. "
    "On her way home she thinks about the books that came back today and the ones that did "
    "not, and she smiles, because tomorrow the tables will fill up again."
)


def _attention(b: _Builder) -> None:
    b.note(
        """
### What attention looks at
Inside a transformer, every token builds its next representation by **attending** to other
tokens: it gives each earlier (or, in an encoder, every) token a weight, and the weights of
one token add up to 1. A model has several **layers**, and each layer several **heads**;
each head learns its own way of looking around.

Press **Run all** and read on.
"""
    )
    b.note(
        """
#### 1. A sentence on SmolLM2 (a GPT-style model)
SmolLM2 reads left to right: a token can only look at itself and the tokens **before** it,
so its attention maps are triangles.

When the cell has run, pick a layer and a head above the heatmap (rows: the token that is
looking; columns: the tokens it looks at). Things to find:

- **Previous-token heads**: a bright line just below the diagonal. That head mostly looks
  at the token right before, which helps the model continue words and phrases.
- **First-token heads**: a bright first column. Many heads park their attention on the
  first token when they have nothing useful to look at (an "attention sink").

Open **Per-head statistics** below the heatmap: one row per head. Sort by
`previous_token` (the average weight on the previous token) or by `first_token` (the
weight on the first token) to find those heads without clicking through all 270 of them
(30 layers × 9 heads); `entropy` is low for heads that focus on one token and high for
heads that spread their attention. On this sentence, for example:

- layer 16, head 0 and layer 1, head 2 put about 0.7-0.8 of their weight on the previous
  token;
- layer 17, head 3 and layer 18, head 8 put almost all of it on the first token.

(Layers and heads are numbered from 0.)
"""
    )
    b.cell(
        "attention",
        {"model": LM, "text": "The cat sat on the mat because it was tired after the long day."},
    )
    b.note(
        """
#### 2. The same sentence on MiniLM (a BERT-style encoder)
MiniLM reads the whole sentence at once: every token may look at every other one, before
and after, so its maps are full squares. It adds two special tokens, `[CLS]` at the start
and `[SEP]` at the end; many heads rest on `[CLS]` (its first token) or `[SEP]` the way
SmolLM2's rest on the first token: in layer 2, head 7, `[CLS]` gets most of the weight.
Layer 0, head 2 is an almost perfect previous-token head. Compare the `first_token` column
of its head table with SmolLM2's.
"""
    )
    b.cell(
        "attention",
        {
            "model": ENCODER,
            "text": "The cat sat on the mat because it was tired after the long day.",
        },
    )
    b.note(
        """
#### 3. A long text
Real inputs are longer. Below, a text of about 270 tokens. The heatmap groups tokens into
words so that it stays readable. Attention to *far away* tokens shows in the
`mean_distance` column of the head table: some heads look only nearby, others across the
whole text.

Every model has a **context length**, the most tokens it can read at once. Here the
second cell allows MiniLM only 256 tokens and cuts the rest off the end (**truncate**);
without truncate, a text that is too long is refused with a message saying so. MiniLM
itself reads at most 512 tokens; SmolLM2 reads 8,192.
"""
    )
    b.cell("attention", {"model": LM, "text": LONG_TEXT, "max_tokens": 512})
    b.cell(
        "attention",
        {"model": ENCODER, "text": LONG_TEXT, "max_tokens": 256, "truncate": True},
    )
    b.note(
        """
#### What to remember
Attention weights show **where information can flow**, not *why* the model decided
something: a head can look at a token and then ignore what it found. The next lesson
measures which words actually changed the answer.
"""
    )


def _why(b: _Builder) -> None:
    b.note(
        f"""
### Why did the model say that?
Ask SmolLM2 to continue *"{PARIS}"*: it answers **Paris**. Which words of the prompt made
it say so? **Attribution** methods give every input token a score: how much it pushed the
model towards the answer.

Press **Run all** and read on.
"""
    )
    b.note(
        """
#### 1. Two methods, one question
- **Integrated Gradients** (IG) slowly "fades in" each token, from an empty placeholder to
  the real word, and adds up how much the answer's score changes along the way. Its scores
  are **complete**: they add up to the change in the score between the empty input and the
  real one. The green (or yellow) box says how close the sum came (the *convergence delta*).
- **Occlusion** hides a few tokens at a time and measures how much the score drops. It asks
  the model directly, with no gradients, but it only sees what hiding a small window does.

The cell explains the target " Paris" (with its leading space: that is the token the model
produces) with both methods. In each tab, look at the coloured prompt: which words matter?
"""
    )
    b.cell(
        "explain",
        {
            "model": LM,
            "text": PARIS,
            "target": " Paris",
            "methods": ["integrated_gradients", "occlusion"],
            "faithfulness": True,
            "seed": 0,
        },
    )
    b.note(
        """
#### 2. Can we trust the scores?
- **Faithfulness** (under each method): delete the tokens a method ranks highest, one by one.
  If the method is right, the score of " Paris" falls fast. *Comprehensiveness* measures
  that fall; compare it with the *random-order* value (deleting tokens in random order): a
  faithful method does much better than random.
- **Method agreement** (the table at the bottom): do the two methods rank the tokens the same
  way? When they disagree, be careful with both.

Here they agree that *Eiffel* and *in* matter, and disagree about the last words. Occlusion
hides three tokens at a time, so a token's score includes its neighbours': hiding
*"the city of"* removes the question itself, and the model no longer says Paris at all.
Integrated Gradients credits those words much less. Neither is "wrong": they answer
slightly different questions.
"""
    )
    b.note(
        """
#### 3. Paris, not London
"Which words made it say Paris?" mixes two questions: which words point to *a city at all*,
and which point to *Paris rather than another city*. A **contrast** answers the second: the
score becomes log p(" Paris") − log p(" London"). Words like *Eiffel Tower* should matter
much more here than *the city of*, which fits London just as well.
"""
    )
    b.cell(
        "explain",
        {
            "model": LM,
            "text": PARIS,
            "target": " Paris",
            "contrast": " London",
            "methods": ["integrated_gradients"],
            "faithfulness": False,
            "seed": 0,
        },
    )
    b.note(
        """
#### Try it
Edit the last cell: change the contrast to " Rome", or the prompt to another landmark
(*"The Colosseum is located in the city of"*, target " Rome"), and run it again.
"""
    )


def _new_task(b: _Builder, out: str) -> None:
    b.note(
        """
### Teach a model a new task
MiniLM was trained to understand sentences, not to judge them. **Fine-tuning** teaches it a
new task from examples: here, about 300 short product and film reviews, each labelled
*positive* or *negative* (the workbench's `sentiment` sample). A small new layer, the
**classification head**, is put on top of the model, and training nudges all its numbers so
that the head gives the right label.

Press **Run all** and read on (the training takes about half a minute).
"""
    )
    b.note(
        f"""
#### 1. Fine-tuning
The cell trains for one **epoch** (one pass over the training sentences) in batches of 16,
with a learning rate of 0.0002. One sentence in five is kept aside (the **validation**
set) and never trained on: the accuracy on it, before and after training, tells how well
the model learned the task rather than memorised the examples. Watch the curves while it
trains: the **loss** should fall.

The new model is saved as `{out}`. To train it again, edit the cell and give it a new
name (a name is used only once).
"""
    )
    tune = b.cell(
        "finetune",
        {
            "base": ENCODER,
            "task": "classification",
            "data": "sentiment",
            "out": out,
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 2e-4,
                "max_length": 32,
                "seed": 0,
            },
        },
    )
    sentence = "The battery died after two days and the screen is already scratched."
    b.note(
        """
#### 2. Use the new model
The next cell takes its model **from the fine-tune cell** (a reference) and classifies a
sentence it has never seen. Look at the probability of each label: how sure is it?
Edit the text and try your own sentences, including tricky ones ("not bad at all").
"""
    )
    b.cell("classify", {"text": sentence}, {"model": Ref(tune, "model")})
    b.note(
        """
#### 3. Why that label?
The same attribution methods as in lesson 3 work on a classifier: the target is the label
the model predicted. Which words pushed it towards that label? Words like *died* and
*scratched* should stand out; if the model relied on words that carry no opinion, it would
have learned a shortcut from the training data, not the task.
"""
    )
    b.cell(
        "explain",
        {
            "text": sentence,
            "label": "",
            "methods": ["integrated_gradients", "occlusion"],
            "faithfulness": True,
            "seed": 0,
        },
        {"model": Ref(tune, "model")},
    )


_BUILDERS: dict[str, Callable[[_Builder, Notebook], None]] = {
    "next-word": lambda b, _book: _next_word(b),
    "attention": lambda b, _book: _attention(b),
    "why": lambda b, _book: _why(b),
    "new-task": lambda b, book: _new_task(b, f"lesson-sentiment-{book.id[:8]}"),
}


def lesson(lesson_id: str) -> Lesson:
    """The lesson with this id; ``InputError`` listing the ids otherwise."""
    for item in LESSONS:
        if item.id == lesson_id:
            return item
    ids = ", ".join(item.id for item in LESSONS)
    raise InputError(f"Unknown lesson {lesson_id!r}: use one of {ids}.")


def open_lesson(store: NotebookStore, lesson_id: str) -> Notebook:
    """A new notebook holding a fresh copy of the lesson (nothing run yet).

    The copy is named "Lesson N: title"; a fine-tune lesson's model gets a name unique to
    the copy, so two copies can both be run.
    """
    item = lesson(lesson_id)
    number = LESSONS.index(item) + 1
    book = store.create(f"Lesson {number}: {item.title}")
    _BUILDERS[item.id](_Builder(store, book.id), book)
    return store.get(book.id)
