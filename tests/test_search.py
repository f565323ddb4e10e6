"""Search in one's own conversations (issue 12, item 9): the querysets, the
snippets, and the JSON endpoint the sidebar asks. Full-text search on
Postgres, a case-insensitive match on SQLite; only ever the user's own."""

import pytest
from django.db import connection
from django.urls import reverse

from conversations import search as search_module
from conversations.account import SEARCH_RESULTS
from conversations.forms import SEARCH_LENGTH
from conversations.models import Conversation, Message
from conversations.search import cut_around, from_headline, marked

pytestmark = pytest.mark.django_db

JSON = {"HTTP_ACCEPT": "application/json"}
POSTGRES = connection.vendor == "postgresql"


def chat(owner, title: str, *texts: str) -> Conversation:
    conversation = Conversation.objects.create(owner=owner, title=title, model="fake")
    for i, text in enumerate(texts):
        role = Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT
        conversation.messages.create(role=role, content=text)
    return conversation


def hits_for(client, q: str) -> list[dict]:
    response = client.get(reverse("conversations:search"), {"q": q}, **JSON)
    assert response.status_code == 200, response.content
    return response.json()["results"]


def text_of(snippet: list[dict]) -> str:
    return "".join(run["text"] for run in snippet)


def marks(snippet: list[dict]) -> list[str]:
    return [run["text"].lower() for run in snippet if run["mark"]]


# the querysets


def test_message_search_finds_the_users_own_messages_only(alice, bob):
    mine = chat(alice, "Weather", "Why is the sky blue?", "Rayleigh scattering.")
    chat(bob, "Bob's sky", "The sky over Bob is grey")

    found = list(Message.objects.search(alice, "sky"))

    assert [m.conversation_id for m in found] == [mine.pk]
    assert found[0].role == Message.Role.USER


def test_message_search_matches_in_any_case(alice):
    chat(alice, "Shouting", "THE OCEAN IS DEEP")

    assert Message.objects.search(alice, "ocean").count() == 1


def test_message_search_needs_every_word(alice):
    chat(alice, "Two", "red apples", "green apples")

    found = list(Message.objects.search(alice, "green apples"))

    assert [m.role for m in found] == [Message.Role.ASSISTANT]


def test_superseded_replies_and_system_rows_are_not_searched(alice):
    conversation = chat(alice, "Regenerated", "tell me about zebras")
    conversation.messages.create(role="assistant", content="old zebras answer", superseded=True)
    conversation.messages.create(role="system", content="zebras are a system thing")

    found = list(Message.objects.search(alice, "zebras"))

    assert [m.role for m in found] == [Message.Role.USER]


def test_an_anonymous_user_finds_nothing(alice, django_user_model):
    from django.contrib.auth.models import AnonymousUser

    chat(alice, "Secret", "the launch codes")

    assert not Message.objects.search(AnonymousUser(), "launch").exists()
    assert not Conversation.objects.for_user(AnonymousUser()).search("Secret").exists()


def test_title_search_is_on_the_users_own_conversations(alice, bob):
    mine = chat(alice, "Holiday plans in Portugal")
    chat(bob, "Portugal for Bob")

    found = list(Conversation.objects.for_user(alice).search("portugal"))

    assert found == [mine]


@pytest.mark.skipif(not POSTGRES, reason="stemming is Postgres full-text search")
def test_postgres_search_matches_other_forms_of_a_word_and_ranks(alice):
    chat(alice, "Forms", "She was running late", "unrelated words here")
    chat(alice, "More", "run, run, run: running runs")

    found = list(Message.objects.search(alice, "run"))

    assert len(found) == 2
    # The message with more matches ranks first.
    assert found[0].headline.count("\ue000") > found[1].headline.count("\ue000")


@pytest.mark.skipif(not POSTGRES, reason="the GIN indexes exist on Postgres only")
def test_postgres_searches_use_the_gin_indexes(alice):
    """The queries compute the very expressions migration 0007 indexed:
    with one rare word among thousands of rows, the planner takes them."""
    many = 3000
    filler = Conversation.objects.create(owner=alice, title="filler", model="fake")
    Message.objects.bulk_create(
        Message(conversation=filler, role="user", content=f"ordinary words {i}")
        for i in range(many)
    )
    Conversation.objects.bulk_create(
        Conversation(owner=alice, title=f"ordinary title {i}") for i in range(many)
    )
    chat(alice, "Aardvark", "the word aardvark, once")
    queries = {
        "message_content_search": Message.objects.search(alice, "aardvark"),
        "conversation_title_search": Conversation.objects.for_user(alice).search("aardvark"),
    }
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE conversations_message")
        cursor.execute("ANALYZE conversations_conversation")
        for index, queryset in queries.items():
            assert index in queryset.explain(), index


# snippets


def test_a_snippet_marks_every_match_in_any_case():
    runs = marked("Sky, sky and SKY.", ["sky"])

    assert text_of(runs) == "Sky, sky and SKY."
    assert marks(runs) == ["sky", "sky", "sky"]


def test_a_long_message_is_cut_around_the_first_match_on_word_boundaries():
    content = "start " + "filler " * 40 + "the needle is here " + "after " * 40

    cut = cut_around(content, ["needle"])

    assert "needle" in cut
    assert cut.startswith("…") and cut.endswith("…")
    assert len(cut) < 200
    assert not cut[1:].startswith(("iller", "ller", "ler"))


def test_a_headline_splits_into_plain_and_marked_runs():
    runs = from_headline("why is the \ue000sky\ue001 so \ue000blue\ue001")

    assert runs == [
        {"text": "why is the ", "mark": False},
        {"text": "sky", "mark": True},
        {"text": " so ", "mark": False},
        {"text": "blue", "mark": True},
    ]


def test_a_snippet_of_a_message_with_html_is_runs_of_text_with_only_the_match_marked(alice):
    chat(alice, "Hostile", '<img src=x onerror="alert(1)"> findme <b>bold</b>')

    [hit] = search_module.search(alice, "findme", 10)

    # Runs of text, never markup: the page builds them with text nodes.
    assert all(set(run) == {"text", "mark"} for run in hit.snippet)
    assert marks(hit.snippet) == ["findme"]
    # Postgres' headline drops the tags; the plain snippet keeps them as text.
    assert "onerror" not in text_of(hit.snippet) or "<img" in text_of(hit.snippet)


# the endpoint


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def test_search_requires_login(client):
    response = client.get(reverse("conversations:search"), {"q": "sky"})

    assert response.status_code == 302


def test_search_answers_hits_with_snippets_and_links(alice_client, alice):
    conversation = chat(alice, "Weather", "Why is the sky blue?", "Because of scattering.")
    question = conversation.messages.get(role="user")

    [hit] = hits_for(alice_client, "sky")

    assert hit["conversation"] == str(conversation.pk)
    assert hit["message"] == str(question.pk)
    assert hit["url"] == conversation.get_absolute_url()
    assert hit["title"] == "Weather"
    assert hit["role"] == "user"
    assert "sky" in marks(hit["snippet"])
    assert "Why is the" in text_of(hit["snippet"])


def test_a_title_match_comes_first_and_names_no_message(alice_client, alice):
    titled = chat(alice, "Volcanoes", "tell me something")
    texted = chat(alice, "Geology", "what about volcanoes?")

    hits = hits_for(alice_client, "volcanoes")

    assert [(h["conversation"], h["message"] is None) for h in hits] == [
        (str(titled.pk), True),
        (str(texted.pk), False),
    ]


def test_search_never_shows_another_users_conversations(client, alice, bob):
    chat(alice, "Alice's secret", "my secret recipe")
    bobs = chat(bob, "Bob's secret", "his secret plan")
    client.force_login(bob)

    hits = hits_for(client, "secret")

    assert {h["conversation"] for h in hits} == {str(bobs.pk)}
    assert all("recipe" not in text_of(h["snippet"]) for h in hits)


def test_search_answers_a_bounded_number_of_hits(alice_client, alice):
    for i in range(SEARCH_RESULTS + 5):
        chat(alice, f"Chat {i}", f"common word {i}")

    body = alice_client.get(reverse("conversations:search"), {"q": "common"}, **JSON).json()

    assert len(body["results"]) == SEARCH_RESULTS == body["limit"]


@pytest.mark.parametrize(
    ("q", "code"),
    [
        pytest.param("", "bad_request", id="empty"),
        pytest.param("   ", "bad_request", id="blank"),
        pytest.param("x" * (SEARCH_LENGTH + 1), "too_large", id="too-long"),
    ],
)
def test_a_search_without_a_usable_query_is_refused(alice_client, q, code):
    response = alice_client.get(reverse("conversations:search"), {"q": q}, **JSON)

    assert response.status_code == 400
    assert response.json()["error"] == code


def test_search_is_get_only(alice_client):
    response = alice_client.post(reverse("conversations:search"), {"q": "sky"}, **JSON)

    assert response.status_code == 405


def test_the_chat_page_gives_the_script_the_search_url_and_limit(alice_client):
    page = alice_client.get(reverse("conversations:chat")).content.decode()

    assert f'data-url-search="{reverse("conversations:search")}"' in page
    assert f'maxlength="{SEARCH_LENGTH}"' in page
