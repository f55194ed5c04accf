//! The bookshop catalogue: one stream per book, keyed by its normalized ISBN, which is what makes
//! ISBNs unique (a second create finds the stream already written).

use crate::aggregate::{decode_event, Aggregate};
use crate::projection::{doc_version, is_deleted, Changes, Doc, FieldOp, Projection};
use crate::{DomainError, RecordedEvent};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The stream type of books (their stream ids are normalized ISBNs).
pub const KIND: &str = "book";
/// Longest title or author accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 512;
/// The index of every live book.
pub const ALL_INDEX: &str = "all";

/// The index of a live author's books: `author:<author>`.
pub fn author_index(author: &str) -> String {
    format!("author:{author}")
}

/// Strips hyphens and spaces from an ISBN and checks its shape: 13 digits (ISBN-13), or 9 digits
/// and a final digit or `X` (ISBN-10; a lowercase `x` is upper-cased). Check digits are not
/// verified.
pub fn normalize_isbn(raw: &str) -> Result<String, DomainError> {
    let isbn: String = raw
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    // Judged on bytes: a multi-byte character makes the length count bytes, so slicing the
    // text at a byte index could split one (a panic found by fuzzing GetBookAt).
    let b = isbn.as_bytes();
    let ok = match b.len() {
        13 => b.iter().all(u8::is_ascii_digit),
        10 => b[..9].iter().all(u8::is_ascii_digit) && (b[9].is_ascii_digit() || b[9] == b'X'),
        _ => false,
    };
    if ok {
        Ok(isbn)
    } else {
        Err(DomainError::invalid(
            "isbn",
            "must be 13 digits (ISBN-13) or 9 digits and a digit or X (ISBN-10); \
             hyphens and spaces are ignored",
        ))
    }
}

/// What a client may ask the catalogue to do with one book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookCommand {
    /// Add a book to the catalogue.
    Create {
        /// The ISBN, in any form [`normalize_isbn`] accepts.
        isbn: String,
        /// Non-empty after trimming, at most [`MAX_TEXT_LEN`] bytes.
        title: String,
        /// Non-empty after trimming, at most [`MAX_TEXT_LEN`] bytes.
        author: String,
        /// Price in cents, ≥ 0.
        price_cents: i64,
    },
    /// Change some of a book's fields; `None` keeps a field as it is.
    Update {
        /// A new title.
        title: Option<String>,
        /// A new author.
        author: Option<String>,
        /// A new price in cents.
        price_cents: Option<i64>,
    },
    /// Remove a book from the catalogue; its ISBN stays taken.
    Delete,
}

impl BookCommand {
    /// Checks the command's fields, independently of any book.
    pub fn validate(&self) -> Result<(), DomainError> {
        match self {
            Self::Create {
                isbn,
                title,
                author,
                price_cents,
            } => {
                normalize_isbn(isbn)?;
                text("title", title)?;
                text("author", author)?;
                price(*price_cents)
            }
            Self::Update {
                title,
                author,
                price_cents,
            } => {
                if title.is_none() && author.is_none() && price_cents.is_none() {
                    return Err(DomainError::invalid(
                        "update",
                        "must change at least one of title, author, price_cents",
                    ));
                }
                title.as_deref().map(|t| text("title", t)).transpose()?;
                author.as_deref().map(|a| text("author", a)).transpose()?;
                price_cents.map(price).transpose()?;
                Ok(())
            }
            Self::Delete => Ok(()),
        }
    }
}

/// Checks a title or author and returns it trimmed, the form in which it is stored.
fn text<'a>(field: &str, value: &'a str) -> Result<&'a str, DomainError> {
    let value = value.trim();
    if value.is_empty() {
        Err(DomainError::invalid(field, "must not be empty"))
    } else if value.len() > MAX_TEXT_LEN {
        Err(DomainError::invalid(
            field,
            format!("is {} bytes, at most {MAX_TEXT_LEN} allowed", value.len()),
        ))
    } else {
        Ok(value)
    }
}

fn price(value: i64) -> Result<(), DomainError> {
    if value < 0 {
        Err(DomainError::invalid("price_cents", "must be at least 0"))
    } else {
        Ok(())
    }
}

/// What happened to a book, at the current schema of each event type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum BookEvent {
    /// The book entered the catalogue.
    BookCreated {
        /// Normalized ISBN.
        isbn: String,
        /// Trimmed title.
        title: String,
        /// Trimmed author.
        author: String,
        /// Price in cents.
        price_cents: i64,
    },
    /// Some fields changed; only those are present.
    BookUpdated {
        /// The new title.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        /// The new author.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        author: Option<String>,
        /// The new price in cents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        price_cents: Option<i64>,
        /// The author before this change (present when `author` is), so that readers can
        /// move the book between author indexes without history.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_author: Option<String>,
    },
    /// The book left the catalogue.
    BookDeleted {
        /// Its author at deletion, so that readers can drop it from the author index.
        author: String,
    },
}

/// A book's write-side state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    /// Whether it was ever created (deleted books still exist, which keeps their ISBN taken).
    pub exists: bool,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Normalized ISBN.
    pub isbn: String,
    /// Title.
    pub title: String,
    /// Author.
    pub author: String,
    /// Price in cents.
    pub price_cents: i64,
}

impl Book {
    /// Reads a book from its [`BookProjection`] document. A deleted book keeps its ISBN (the
    /// tombstone records it), which keeps the ISBN taken.
    pub fn from_doc(doc: &Doc) -> Book {
        let text = |field: &str| doc.get(field).cloned().unwrap_or_default();
        let deleted = is_deleted(doc);
        let isbn = text("isbn");
        Book {
            exists: deleted || !isbn.is_empty(),
            deleted,
            isbn,
            title: text("title"),
            author: text("author"),
            price_cents: doc
                .get("price_cents")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

impl Aggregate for Book {
    const KIND: &'static str = KIND;
    type Command = BookCommand;
    type Event = BookEvent;
    type Projection = BookProjection;

    fn from_doc(doc: &Doc) -> Self {
        Book::from_doc(doc)
    }

    fn decide(&self, command: &BookCommand) -> Result<Vec<BookEvent>, DomainError> {
        command.validate()?;
        let event = match command {
            BookCommand::Create {
                isbn,
                title,
                author,
                price_cents,
            } => {
                let isbn = normalize_isbn(isbn)?;
                if self.exists {
                    return Err(DomainError::Rule(format!(
                        "a book with ISBN {isbn} already exists"
                    )));
                }
                BookEvent::BookCreated {
                    isbn,
                    title: title.trim().to_owned(),
                    author: author.trim().to_owned(),
                    price_cents: *price_cents,
                }
            }
            BookCommand::Update {
                title,
                author,
                price_cents,
            } => {
                self.live()?;
                // Only real changes are recorded, so repeating an update is a no-op.
                let changed = |new: &Option<String>, old: &str| {
                    new.as_deref()
                        .map(str::trim)
                        .filter(|n| *n != old)
                        .map(str::to_owned)
                };
                let title = changed(title, &self.title);
                let author = changed(author, &self.author);
                let price_cents = price_cents.filter(|p| *p != self.price_cents);
                if title.is_none() && author.is_none() && price_cents.is_none() {
                    return Ok(Vec::new());
                }
                BookEvent::BookUpdated {
                    previous_author: author.as_ref().map(|_| self.author.clone()),
                    title,
                    author,
                    price_cents,
                }
            }
            BookCommand::Delete => {
                self.live()?;
                BookEvent::BookDeleted {
                    author: self.author.clone(),
                }
            }
        };
        Ok(vec![event])
    }

    fn command_for(stream_id: &str, event: &BookEvent) -> Result<BookCommand, DomainError> {
        Ok(match event {
            BookEvent::BookCreated {
                isbn,
                title,
                author,
                price_cents,
            } => {
                if isbn != stream_id {
                    return Err(DomainError::Rule(format!(
                        "the book's isbn {} is not its stream id {stream_id}",
                        crate::quote(isbn)
                    )));
                }
                BookCommand::Create {
                    isbn: isbn.clone(),
                    title: title.clone(),
                    author: author.clone(),
                    price_cents: *price_cents,
                }
            }
            BookEvent::BookUpdated {
                title,
                author,
                price_cents,
                ..
            } => BookCommand::Update {
                title: title.clone(),
                author: author.clone(),
                price_cents: *price_cents,
            },
            BookEvent::BookDeleted { .. } => BookCommand::Delete,
        })
    }
}

impl Book {
    /// Refuses commands on a book that was never created or is deleted. A book that never
    /// existed has no ISBN in its state (commands other than Create do not carry one), so the
    /// caller, which knows the stream id, may add it to the message.
    fn live(&self) -> Result<(), DomainError> {
        if !self.exists {
            Err(DomainError::NotFound("book not found".into()))
        } else if self.deleted {
            Err(DomainError::Rule(format!("book {} is deleted", self.isbn)))
        } else {
            Ok(())
        }
    }
}

/// The catalogue read model: one document per book, plus the `all` and `author:<author>`
/// indexes of live books.
#[derive(Debug, Clone, Copy, Default)]
pub struct BookProjection;

impl Projection for BookProjection {
    fn name(&self) -> &'static str {
        "book"
    }

    fn handles(&self, stream_kind: &str) -> bool {
        stream_kind == KIND
    }

    fn project(&self, event: &RecordedEvent, out: &mut Changes) -> Result<(), String> {
        let book_event = decode_event::<BookEvent>(event)?;
        let member = self.doc_id(&event.stream);
        let at = event.recorded_at_us.to_string();
        let set = |field: &str, value: String| FieldOp::Set(field.to_owned(), value);
        match book_event {
            BookEvent::BookCreated {
                isbn,
                title,
                author,
                price_cents,
            } => {
                out.fields.extend([
                    set("isbn", isbn),
                    set("title", title),
                    set("author", author),
                    set("price_cents", price_cents.to_string()),
                    set("created_at_us", at.clone()),
                    set("updated_at_us", at),
                ]);
            }
            BookEvent::BookUpdated {
                title,
                author,
                price_cents,
                previous_author: _,
            } => {
                out.fields.extend(
                    [
                        title.map(|t| set("title", t)),
                        author.map(|a| set("author", a)),
                        price_cents.map(|p| set("price_cents", p.to_string())),
                        Some(set("updated_at_us", at)),
                    ]
                    .into_iter()
                    .flatten(),
                );
            }
            BookEvent::BookDeleted { author: _ } => {
                // The tombstone keeps the ISBN, which stays taken.
                out.fields
                    .extend([FieldOp::Tombstone, set("isbn", member.clone())]);
            }
        }
        Ok(())
    }

    fn has_indexes(&self) -> bool {
        true
    }

    fn indexes(&self, doc: &HashMap<String, String>) -> Vec<String> {
        match BookView::from_doc(doc) {
            Some(book) => vec![ALL_INDEX.to_owned(), author_index(&book.author)],
            None => Vec::new(),
        }
    }
}

/// A live book as queries see it, read from a [`BookProjection`] document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookView {
    /// Normalized ISBN.
    pub isbn: String,
    /// Title.
    pub title: String,
    /// Author.
    pub author: String,
    /// Price in cents.
    pub price_cents: i64,
    /// When the book was created, microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// When it last changed, microseconds since the Unix epoch.
    pub updated_at_us: i64,
    /// The last stream version the document reflects.
    pub version: u64,
}

impl BookView {
    /// Reads a book document; `None` for a deleted book or an incomplete document.
    pub fn from_doc(doc: &HashMap<String, String>) -> Option<BookView> {
        if is_deleted(doc) {
            return None;
        }
        let int = |field: &str| doc.get(field)?.parse::<i64>().ok();
        Some(BookView {
            isbn: doc.get("isbn")?.clone(),
            title: doc.get("title")?.clone(),
            author: doc.get("author")?.clone(),
            price_cents: int("price_cents")?,
            created_at_us: int("created_at_us")?,
            updated_at_us: int("updated_at_us")?,
            version: doc_version(doc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::fold;
    use crate::testing::{recorded_at, Given};
    use serde_json::json;

    const ISBN: &str = "9780441478125";

    fn create(title: &str, author: &str, price_cents: i64) -> BookCommand {
        BookCommand::Create {
            isbn: "978-0-441-47812-5".into(),
            title: title.into(),
            author: author.into(),
            price_cents,
        }
    }

    fn update(title: Option<&str>, author: Option<&str>, price_cents: Option<i64>) -> BookCommand {
        BookCommand::Update {
            title: title.map(Into::into),
            author: author.map(Into::into),
            price_cents,
        }
    }

    fn delete() -> BookCommand {
        BookCommand::Delete
    }

    fn book() -> Given<Book> {
        Given::new(ISBN)
    }

    fn created() -> Given<Book> {
        book().ok(create(
            "The Left Hand of Darkness",
            "Ursula K. Le Guin",
            1299,
        ))
    }

    fn invalid_field(result: Result<usize, DomainError>) -> String {
        match result {
            Err(DomainError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn isbn_13_and_10_are_normalized() {
        assert_eq!(normalize_isbn("978-0-441-47812-5"), Ok(ISBN.to_owned()));
        assert_eq!(
            normalize_isbn(" 0 441 47812 2 "),
            Ok("0441478122".to_owned())
        );
        assert_eq!(normalize_isbn("0-8044-2957-x"), Ok("080442957X".to_owned()));
    }

    #[test]
    fn malformed_isbns_are_invalid() {
        for raw in [
            "",
            "978044147812",
            "97804414781255",
            "X441478122",
            "04414781X2",
            "978-0-441-4781a-5",
            // Ten bytes with a multi-byte character across the ninth: once a panic (fuzzing).
            "Ω≈ç√",
            "12345678é",
            "123456789√",
        ] {
            assert!(
                matches!(normalize_isbn(raw), Err(DomainError::Invalid { ref field, .. }) if field == "isbn"),
                "{raw:?}"
            );
        }
        assert_eq!(
            invalid_field(book().run(BookCommand::Create {
                isbn: "12".into(),
                title: "T".into(),
                author: "A".into(),
                price_cents: 1
            })),
            "isbn"
        );
    }

    #[test]
    fn title_and_author_must_not_be_blank() {
        assert_eq!(invalid_field(book().run(create("  ", "A", 1))), "title");
        assert_eq!(invalid_field(book().run(create("T", "", 1))), "author");
        assert_eq!(
            invalid_field(created().run(update(Some(" "), None, None))),
            "title"
        );
        assert_eq!(
            invalid_field(created().run(update(None, Some("\t"), None))),
            "author"
        );
    }

    #[test]
    fn title_and_author_are_at_most_512_bytes() {
        let long = "é".repeat(MAX_TEXT_LEN / 2 + 1);
        assert_eq!(invalid_field(book().run(create(&long, "A", 1))), "title");
        assert_eq!(invalid_field(book().run(create("T", &long, 1))), "author");
        assert_eq!(book().run(create(&"a".repeat(MAX_TEXT_LEN), "A", 1)), Ok(1));
    }

    #[test]
    fn text_is_stored_trimmed() {
        let b = book().ok(create("  Dune ", " Frank Herbert", 0));
        assert_eq!(
            (b.state.title.as_str(), b.state.author.as_str()),
            ("Dune", "Frank Herbert")
        );
    }

    #[test]
    fn price_must_not_be_negative() {
        assert_eq!(
            invalid_field(book().run(create("T", "A", -1))),
            "price_cents"
        );
        assert_eq!(
            invalid_field(created().run(update(None, None, Some(-5)))),
            "price_cents"
        );
        assert_eq!(book().run(create("T", "A", 0)), Ok(1));
    }

    #[test]
    fn update_must_name_a_field() {
        let err = created()
            .run(update(None, None, None))
            .expect_err("refused");
        assert_eq!(
            err,
            DomainError::invalid(
                "update",
                "must change at least one of title, author, price_cents"
            )
        );
    }

    #[test]
    fn validation_comes_before_existence() {
        assert_eq!(
            invalid_field(book().run(update(Some(""), None, None))),
            "title"
        );
        assert_eq!(invalid_field(created().run(create("", "A", 1))), "title");
    }

    #[test]
    fn create_of_an_existing_isbn_is_refused() {
        let err = created()
            .run(create("Other", "Someone", 1))
            .expect_err("refused");
        assert_eq!(
            err,
            DomainError::Rule(format!("a book with ISBN {ISBN} already exists"))
        );
    }

    #[test]
    fn create_of_a_deleted_isbn_is_refused() {
        let err = created()
            .ok(delete())
            .run(create("Other", "Someone", 1))
            .expect_err("refused");
        assert_eq!(
            err,
            DomainError::Rule(format!("a book with ISBN {ISBN} already exists"))
        );
    }

    #[test]
    fn update_or_delete_of_a_missing_book_is_not_found() {
        let not_found = DomainError::NotFound("book not found".into());
        assert_eq!(
            book().run(update(Some("T"), None, None)),
            Err(not_found.clone())
        );
        assert_eq!(book().run(delete()), Err(not_found));
    }

    #[test]
    fn update_or_delete_of_a_deleted_book_is_refused() {
        let deleted = DomainError::Rule(format!("book {ISBN} is deleted"));
        let mut b = created().ok(delete());
        assert!(b.state.deleted);
        assert_eq!(b.run(update(Some("T"), None, None)), Err(deleted.clone()));
        assert_eq!(b.run(delete()), Err(deleted));
    }

    #[test]
    fn update_that_changes_nothing_is_a_no_op() {
        let mut b = created();
        assert_eq!(
            b.run(update(Some("The Left Hand of Darkness "), None, Some(1299))),
            Ok(0)
        );
        assert_eq!(b.history.len(), 1);
    }

    #[test]
    fn update_records_only_changed_fields_and_the_previous_author() {
        let b = created()
            .ok(update(Some("The Left Hand of Darkness"), None, Some(999)))
            .ok(update(None, Some("U. K. Le Guin"), None));
        let payloads: Vec<_> = b.history.iter().map(|e| e.json().expect("JSON")).collect();
        assert_eq!(payloads[1], json!({"price_cents": 999}));
        assert_eq!(
            payloads[2],
            json!({"author": "U. K. Le Guin", "previous_author": "Ursula K. Le Guin"})
        );
        assert_eq!(
            (b.state.price_cents, b.state.author.as_str()),
            (999, "U. K. Le Guin")
        );
    }

    #[test]
    fn events_are_self_describing_json() {
        let b = created().ok(delete());
        let shapes: Vec<_> = b
            .history
            .iter()
            .map(|e| {
                (
                    e.event_type.as_str(),
                    e.schema_version,
                    e.json().expect("JSON"),
                )
            })
            .collect();
        assert_eq!(
            shapes,
            [
                (
                    "BookCreated",
                    1,
                    json!({"isbn": ISBN, "title": "The Left Hand of Darkness",
                           "author": "Ursula K. Le Guin", "price_cents": 1299})
                ),
                ("BookDeleted", 1, json!({"author": "Ursula K. Le Guin"})),
            ]
        );
    }

    #[test]
    fn projection_folds_into_the_view() {
        let b = created().ok(update(Some("Left Hand"), None, Some(1000)));
        let view = BookView::from_doc(&fold(&BookProjection, &b.history).expect("fold"))
            .expect("live book");
        assert_eq!(
            view,
            BookView {
                isbn: ISBN.into(),
                title: "Left Hand".into(),
                author: "Ursula K. Le Guin".into(),
                price_cents: 1000,
                created_at_us: recorded_at(1),
                updated_at_us: recorded_at(2),
                version: 2,
            }
        );
    }

    #[test]
    fn index_membership_follows_the_document() {
        let b = created()
            .ok(update(None, Some("U. K. Le Guin"), None))
            .ok(delete());
        let after = |n: usize| {
            BookProjection.indexes(&fold(&BookProjection, &b.history[..n]).expect("fold"))
        };
        assert_eq!(after(1), ["all", "author:Ursula K. Le Guin"]);
        assert_eq!(after(2), ["all", "author:U. K. Le Guin"]);
        assert!(after(3).is_empty(), "a deleted book is in no index");
    }

    #[test]
    fn deleted_book_leaves_a_tombstone() {
        let doc = fold(&BookProjection, &created().ok(delete()).history).expect("fold");
        assert!(is_deleted(&doc));
        assert_eq!(doc_version(&doc), 2);
        assert_eq!(
            doc.len(),
            3,
            "only the version, the deleted mark and the ISBN remain"
        );
        assert_eq!(BookView::from_doc(&doc), None);
        let book = Book::from_doc(&doc);
        assert!(book.exists && book.deleted);
        assert_eq!(book.isbn, ISBN);
    }

    #[test]
    fn incomplete_document_has_no_view() {
        let mut doc = fold(&BookProjection, &created().history).expect("fold");
        doc.remove("price_cents");
        assert_eq!(BookView::from_doc(&doc), None);
        assert_eq!(BookView::from_doc(&HashMap::new()), None);
    }

    fn check(
        given: &Given<Book>,
        event: serde_json::Value,
        event_type: &str,
    ) -> Result<(), DomainError> {
        let e = crate::NewEvent::json(event_type, 1, &event);
        crate::aggregate::check_append::<Book>(&given.stream, &given.folded, &[e])
    }

    fn rule_refused(result: Result<(), DomainError>) -> String {
        match result {
            Err(DomainError::Rule(m)) => m,
            other => panic!("expected a rule refusal, got {other:?}"),
        }
    }

    #[test]
    fn raw_book_events_are_held_to_the_catalogue_rules() {
        let created_json = json!({"isbn": ISBN, "title": "T", "author": "A", "price_cents": 5});
        // Created once, under its own ISBN, with valid fields.
        assert_eq!(check(&book(), created_json.clone(), "BookCreated"), Ok(()));
        let other = json!({"isbn": "9780000000019", "title": "T", "author": "A", "price_cents": 5});
        assert!(rule_refused(check(&book(), other, "BookCreated")).contains("stream id"));
        let blank = json!({"isbn": ISBN, "title": " ", "author": "A", "price_cents": 5});
        assert!(matches!(
            check(&book(), blank, "BookCreated"),
            Err(DomainError::Invalid { ref field, .. }) if field == "events[0].data.title"
        ));
        let live = created();
        assert!(
            rule_refused(check(&live, created_json.clone(), "BookCreated"))
                .contains("already exists")
        );
        // Updates record real changes, with the author they replace.
        let author = |a: &str, previous: &str| json!({"author": a, "previous_author": previous});
        let current = live.state.author.clone();
        assert_eq!(check(&live, author("B", &current), "BookUpdated"), Ok(()));
        assert!(
            rule_refused(check(&live, author("B", "someone else"), "BookUpdated"))
                .contains("records")
        );
        assert!(rule_refused(check(
            &live,
            json!({"title": live.state.title}),
            "BookUpdated"
        ))
        .contains("nothing"));
        // A deletion names the current author; nothing follows it.
        assert!(
            rule_refused(check(&live, json!({"author": "nobody"}), "BookDeleted"))
                .contains("records")
        );
        let deleted = created().ok(delete());
        assert!(
            rule_refused(check(&deleted, created_json, "BookCreated")).contains("already exists")
        );
        assert!(
            rule_refused(check(&deleted, json!({"price_cents": 1}), "BookUpdated"))
                .contains("deleted")
        );
        // Never created: nothing to update or delete.
        assert!(
            rule_refused(check(&book(), json!({"price_cents": 1}), "BookUpdated"))
                .contains("not found")
        );
    }
}
