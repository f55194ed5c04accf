//! `esq.cart.v1.CartCommands` and `esq.bookshop.v1.BookCommands`: thin translations from
//! requests to domain commands, run by the [`Executor`].

use crate::commands::{CommandOptions, Executor};
use esq::convert::status_from_domain;
use esq::pb::bookshop::v1 as book_pb;
use esq::pb::cart::v1 as cart_pb;
use esq_domain::bookshop::{self, Book, BookCommand};
use esq_domain::cart::{Cart, CartCommand};
use esq_domain::ids::validate_id;
use esq_domain::{DomainError, StreamId};
use esq_eventstore::{EventStore, Snapshots};
use tonic::{Request, Response, Status};

/// Longest accepted idempotency key, in bytes.
const MAX_COMMAND_ID_LEN: usize = 128;

fn options<'a>(
    expected_version: Option<u64>,
    command_id: &'a str,
    deadline: Option<std::time::Instant>,
) -> Result<CommandOptions<'a>, Status> {
    if command_id.len() > MAX_COMMAND_ID_LEN {
        return Err(status_from_domain(DomainError::invalid(
            "command_id",
            format!(
                "is {} bytes, at most {MAX_COMMAND_ID_LEN} allowed",
                command_id.len()
            ),
        )));
    }
    Ok(CommandOptions {
        expected_version,
        command_id,
        deadline,
    })
}

fn cart_stream(cart_id: &str) -> Result<StreamId, Status> {
    validate_id("cart_id", cart_id).map_err(status_from_domain)?;
    StreamId::new(esq_domain::cart::KIND, cart_id).map_err(status_from_domain)
}

/// The `esq.cart.v1.CartCommands` service.
pub struct CartCommandsApi<S>(pub Executor<S>);

impl<S: EventStore + Snapshots> CartCommandsApi<S> {
    async fn run(
        &self,
        cart_id: &str,
        command: CartCommand,
        expected_version: Option<u64>,
        command_id: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Response<cart_pb::CartCommandResponse>, Status> {
        let stream = cart_stream(cart_id)?;
        command.validate().map_err(status_from_domain)?;
        let version = self
            .0
            .execute::<Cart>(
                &stream,
                &command,
                options(expected_version, command_id, deadline)?,
            )
            .await?;
        Ok(Response::new(cart_pb::CartCommandResponse {
            cart_id: cart_id.to_owned(),
            version,
        }))
    }
}

#[tonic::async_trait]
impl<S: EventStore + Snapshots> cart_pb::cart_commands_server::CartCommands for CartCommandsApi<S> {
    async fn add_item(
        &self,
        request: Request<cart_pb::AddItemRequest>,
    ) -> Result<Response<cart_pb::CartCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        let command = CartCommand::AddItem {
            sku: r.sku,
            quantity: r.quantity,
            unit_price_cents: r.unit_price_cents,
        };
        self.run(
            &r.cart_id,
            command,
            r.expected_version,
            &r.command_id,
            deadline,
        )
        .await
    }

    async fn remove_item(
        &self,
        request: Request<cart_pb::RemoveItemRequest>,
    ) -> Result<Response<cart_pb::CartCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        let command = CartCommand::RemoveItem {
            sku: r.sku,
            quantity: r.quantity,
        };
        self.run(
            &r.cart_id,
            command,
            r.expected_version,
            &r.command_id,
            deadline,
        )
        .await
    }

    async fn checkout(
        &self,
        request: Request<cart_pb::CheckoutRequest>,
    ) -> Result<Response<cart_pb::CartCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        self.run(
            &r.cart_id,
            CartCommand::Checkout,
            r.expected_version,
            &r.command_id,
            deadline,
        )
        .await
    }
}

/// The `esq.bookshop.v1.BookCommands` service.
pub struct BookCommandsApi<S>(pub Executor<S>);

impl<S: EventStore + Snapshots> BookCommandsApi<S> {
    async fn run(
        &self,
        isbn: &str,
        command: BookCommand,
        expected_version: Option<u64>,
        command_id: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Response<book_pb::BookCommandResponse>, Status> {
        let isbn = bookshop::normalize_isbn(isbn).map_err(status_from_domain)?;
        command.validate().map_err(status_from_domain)?;
        let stream = StreamId::new(bookshop::KIND, isbn.clone()).map_err(status_from_domain)?;
        let version = self
            .0
            .execute::<Book>(
                &stream,
                &command,
                options(expected_version, command_id, deadline)?,
            )
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => Status::not_found(format!("book {isbn} not found")),
                _ => s,
            })?;
        Ok(Response::new(book_pb::BookCommandResponse {
            isbn,
            version,
        }))
    }
}

#[tonic::async_trait]
impl<S: EventStore + Snapshots> book_pb::book_commands_server::BookCommands for BookCommandsApi<S> {
    async fn create_book(
        &self,
        request: Request<book_pb::CreateBookRequest>,
    ) -> Result<Response<book_pb::BookCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        let command = BookCommand::Create {
            isbn: r.isbn.clone(),
            title: r.title,
            author: r.author,
            price_cents: r.price_cents,
        };
        self.run(&r.isbn, command, None, &r.command_id, deadline)
            .await
    }

    async fn update_book(
        &self,
        request: Request<book_pb::UpdateBookRequest>,
    ) -> Result<Response<book_pb::BookCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        let command = BookCommand::Update {
            title: r.title,
            author: r.author,
            price_cents: r.price_cents,
        };
        self.run(
            &r.isbn,
            command,
            r.expected_version,
            &r.command_id,
            deadline,
        )
        .await
    }

    async fn delete_book(
        &self,
        request: Request<book_pb::DeleteBookRequest>,
    ) -> Result<Response<book_pb::BookCommandResponse>, Status> {
        let deadline = esq::convert::deadline(request.metadata());
        let r = request.into_inner();
        self.run(
            &r.isbn,
            BookCommand::Delete,
            r.expected_version,
            &r.command_id,
            deadline,
        )
        .await
    }
}
