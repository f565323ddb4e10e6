"""The input of the HTTP endpoints. Each length comes from where it is kept:
the model field, TITLE_LENGTH or settings.CHAT_MAX_CONTENT."""

import json
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from confusable_homoglyphs import confusables
from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.models import User
from django.db import models

from .models import TITLE_LENGTH, ApiToken, Conversation


def max_length(model: type[models.Model], name: str) -> int:
    """A CharField's max_length: get_field() may return a relation, and a
    field's max_length may be None, neither of which these are."""
    field = model._meta.get_field(name)
    if not isinstance(field, models.CharField) or field.max_length is None:
        raise TypeError(f"{model.__name__}.{name} is not a CharField with a max_length.")
    return field.max_length


MODEL_LENGTH = max_length(Conversation, "model")
TOKEN_NAME_LENGTH = max_length(ApiToken, "name")


class LineField(forms.CharField):
    """One line of text: runs of whitespace become one space, and text over
    `cut_to` is cut rather than refused, as a sidebar title may well be."""

    def __init__(self, *, cut_to: int, **kwargs) -> None:
        self.cut_to = cut_to
        super().__init__(**kwargs)

    def to_python(self, value) -> str:
        text = super().to_python(value)
        # None only with empty_value=None, which no LineField sets.
        assert text is not None
        return " ".join(text.split())[: self.cut_to].rstrip()


class RenameForm(forms.Form):
    title = LineField(cut_to=TITLE_LENGTH, error_messages={"required": "A title is needed."})


class SettingsForm(forms.Form):
    model = forms.CharField(required=False)
    # Not stripped: leading blanks in a prompt are the user's to keep.
    system = forms.CharField(required=False, strip=False)

    def clean_model(self) -> str:
        return self.cleaned_data["model"][:MODEL_LENGTH]

    def clean_system(self) -> str:
        # Read here, not at import, so the limit follows the settings in force.
        if len(self.cleaned_data["system"]) > settings.CHAT_MAX_CONTENT:
            raise forms.ValidationError("The system prompt is too long.", code="max_length")
        return self.cleaned_data["system"]

    def changes(self) -> dict[str, str]:
        """The Conversation fields to save: a blank model keeps the model,
        and a post without a system prompt keeps the prompt."""
        changes = {}
        if self.cleaned_data["model"]:
            changes["model"] = self.cleaned_data["model"]
        if "system" in self.data:
            changes["system_prompt"] = self.cleaned_data["system"]
        return changes


class TokenForm(forms.Form):
    name = LineField(cut_to=TOKEN_NAME_LENGTH, required=False)

    def clean_name(self) -> str:
        return self.cleaned_data["name"] or "token"


def _homoglyph_table() -> dict[str, str]:
    """Each character that Unicode's confusables list (TR39, as packaged by
    confusable_homoglyphs) gives look-alikes for, mapped to the smallest of
    it and its one-character look-alikes: a stand-in for TR39's prototype."""
    path = Path(confusables.__file__).with_name("confusables.json")
    table = {}
    for char, entries in json.loads(path.read_text(encoding="utf-8")).items():
        singles = [e["c"] for e in entries if len(e["c"]) == 1]
        table[char] = min([char, *singles])
    return table


_HOMOGLYPHS: dict[str, str] = {}


def name_skeleton(name: str) -> str:
    """What a name looks like: "alice" with a Cyrillic a, "ALICE", "a1ice"
    and "alice" share one. NFKC folds compatibility forms (fullwidth, ligatures),
    casefold the case, the table the look-alikes of other scripts."""
    if not _HOMOGLYPHS:
        _HOMOGLYPHS.update(_homoglyph_table())
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(_HOMOGLYPHS.get(char, char) for char in folded)


if TYPE_CHECKING:  # the stubs make the form generic; Django's class is not
    _UserCreationForm = UserCreationForm[User]
else:
    _UserCreationForm = UserCreationForm


class SignupForm(_UserCreationForm):
    """Django's sign-up form (which already refuses a name differing from
    another only by case), also refusing a name that looks like another."""

    def clean_username(self) -> str:
        username = super().clean_username()
        if self.has_error("username"):  # differs only by case (and is None)
            return username
        skeleton = name_skeleton(username)
        # Every name is compared, in Python: the database cannot compute a
        # skeleton, and sign-ups are rare and rate-limited. Not .iterator():
        # on Postgres, leaving its server-side cursor at the first match
        # breaks the next transaction when the cursor is collected.
        names = list(get_user_model().objects.values_list("username", flat=True))
        for existing in names:
            if name_skeleton(existing) == skeleton:
                raise forms.ValidationError(
                    "This name looks too much like an existing user's name (%(existing)s). "
                    "Choose another.",
                    code="confusable",
                    params={"existing": existing},
                )
        return username


# Issue 12: search, import and account deletion (conversations/account.py).

SEARCH_LENGTH = 200


class SearchForm(forms.Form):
    q = forms.CharField(
        max_length=SEARCH_LENGTH,
        error_messages={
            "required": "Type something to search for.",
            "max_length": f"A search is at most {SEARCH_LENGTH} characters.",
        },
    )


class ImportForm(forms.Form):
    file = forms.FileField(
        label="Export file (JSON)",
        error_messages={"required": "Choose a file to import.", "empty": "The file is empty."},
    )

    def clean_file(self):
        upload = self.cleaned_data["file"]
        # Read here, not at import, so the limit follows the settings in force.
        limit = settings.CHAT_IMPORT_MAX_BYTES
        if upload.size > limit:
            raise forms.ValidationError(
                "The file is %(size)s bytes; the most this site imports is %(limit)s.",
                code="too_large",
                params={"size": upload.size, "limit": limit},
            )
        return upload


class DeleteAccountForm(forms.Form):
    password = forms.CharField(
        label="Your password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def __init__(self, user, *args, **kwargs) -> None:
        self.user = user
        super().__init__(*args, **kwargs)

    def clean_password(self) -> str:
        password = self.cleaned_data["password"]
        if not self.user.check_password(password):
            raise forms.ValidationError("That is not your password.", code="password_incorrect")
        return password
