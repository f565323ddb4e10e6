"""The input of the HTTP endpoints. Each length comes from where it is kept:
the model field, TITLE_LENGTH or settings.CHAT_MAX_CONTENT."""

from django import forms
from django.conf import settings
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
